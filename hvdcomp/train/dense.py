"""The dense P-SGD baseline of ``hvdcomp train`` (``--algorithm psgd``, nothing compressed).

On the Horovod engine it is Horovod's own ``hvd.DistributedOptimizer``: the optimizer users know,
its allreduces launched from the gradient hooks during backward and fused by Horovod.

On the torch engine it is :class:`AllreduceOptimizer`: after backward, one allreduce average per
gradient through the communicator (``op="average"``: the sum over ranks times ``1/N`` in the
gradient's dtype, Horovod's ``Average``), written back into ``p.grad``, then the wrapped SGD's
step. The arithmetic is Horovod's; only the schedule differs (nothing overlaps backward, as in
``torch.distributed`` without DDP), so time, not the trajectory, tells the two apart. A gradient
that is ``None`` on a step is averaged as zeros, as Horovod's ``synchronize`` does.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, List, Tuple

import torch

PREFIX = "hvdcomp.train.dense"


def dense_optimizer(base: torch.optim.Optimizer, named_parameters: Iterable[Tuple[str, Any]],
                    comm):
    """``base`` wrapped so that ``step()`` applies the gradient averaged over ranks."""
    from hvdcomp.comm import HorovodCommunicator
    if isinstance(comm, HorovodCommunicator):
        return comm.hvd.DistributedOptimizer(base, named_parameters=named_parameters)
    return AllreduceOptimizer(base, named_parameters, comm)


class AllreduceOptimizer:
    """What the training loop uses of ``hvd.DistributedOptimizer`` (``synchronize``,
    ``skip_synchronize``, ``step``, ``zero_grad``, ``param_groups``, state), over a communicator."""

    def __init__(self, base: torch.optim.Optimizer, named_parameters, comm):
        self.base = base
        self.comm = comm
        self._named: List[Tuple[str, torch.Tensor]] = sorted(
            (name, p) for name, p in named_parameters if p.requires_grad)
        self._should_synchronize = True

    @property
    def param_groups(self):
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def synchronize(self) -> None:
        """Every gradient replaced by its average over ranks (all allreduces in flight at once)."""
        if self.comm.size == 1:
            return      # Horovod leaves the gradients of a world of one untouched, too
        pending = []
        for name, p in self._named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            pending.append((p, self.comm.allreduce_async(p.grad, f"{PREFIX}.{name}", "average")))
        for p, handle in pending:
            p.grad.copy_(handle.wait())

    @contextlib.contextmanager
    def skip_synchronize(self):
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            self.synchronize()
        return self.base.step(closure)

    def state_dict(self) -> Dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.base.load_state_dict(state)
