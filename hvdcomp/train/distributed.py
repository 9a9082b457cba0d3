"""The training loop's distributed optimizer: which one runs, and the one adapter to it.

The only code that knows which distributed optimizer runs is :func:`build_distributed_optimizer`:

* ``psgd`` with ``none`` both ways (the dense baseline, :func:`is_dense_baseline`): on the
  Horovod engine Horovod's own ``hvd.DistributedOptimizer`` (ring allreduce of the dense gradient,
  fused by Horovod), on the torch engine :class:`.dense.AllreduceOptimizer` (one allreduce average
  per gradient through the communicator, the arithmetic of Horovod's ``Average``);
* a method that owns its exchange (MoNNA: ``TrainingMethod.train_step`` of the registry,
  :mod:`hvdcomp.algorithms.registry`, returns :class:`.robust_step.MoNNAStep`) steps itself;
* everything else: ``hvdcomp.DistributedOptimizer`` over the engine's communicator, with the
  compression of :func:`make_compression`. It averages LIEC-SGD's models itself in ``step()``.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Optional

import torch

from .. import stall
from ..exchange_ledger import ring_allreduce_mean
from .config import TrainConfig

COUNTERS = ("bytes_up", "bytes_down", "time_compress", "time_comm")


# --- the one place that knows the distributed optimizer -------------------------------------------
def build_distributed_optimizer(model: torch.nn.Module, cfg: TrainConfig, comm,
                                steps_per_epoch_: Optional[int] = None) -> "DistributedStep":
    """The SGD optimizer of ``cfg`` wrapped for data-parallel training over ``comm`` (the
    engine's communicator; see the module docstring for which optimizer runs).

    DGC and EF21-SGDM carry their momentum inside the compressed update; the tensors they send
    dense get the method's momentum in a parameter group of their own (:mod:`.uncompressed`).
    """
    from hvdcomp.algorithms import registry
    own_step = registry.method(cfg.algorithm).train_step(model, cfg, comm)
    if own_step is not None:   # the method owns its exchange (MoNNA)
        return own_step
    from hvdcomp.optimizer import DEFAULT_SMALL_TENSOR_BYTES
    from .uncompressed import parameter_groups
    base = torch.optim.SGD(parameter_groups(model, cfg, DEFAULT_SMALL_TENSOR_BYTES), lr=cfg.lr,
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                         if p.requires_grad)
    if is_dense_baseline(cfg):
        from .dense import dense_optimizer
        optimizer = dense_optimizer(base, model.named_parameters(), comm)
        return DistributedStep(optimizer, gradient_bytes, comm.size, horovod_baseline=True)
    # lazily: only the compressed paths need the integration layer
    from hvdcomp.optimizer import DistributedOptimizer
    compression = make_compression(cfg, comm.size, comm.rank, steps_per_epoch_)
    optimizer = DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                     compression=compression, bucket_bytes=cfg.bucket_bytes,
                                     small_tensor_bytes=DEFAULT_SMALL_TENSOR_BYTES,
                                     pattern=cfg.pattern, comm=comm)
    return DistributedStep(optimizer, gradient_bytes, comm.size, horovod_baseline=False)


def is_dense_baseline(cfg: TrainConfig) -> bool:
    """P-SGD with nothing compressed: the engine's own dense allreduce (module docstring)."""
    return cfg.algorithm == "psgd" and cfg.up == "none" and cfg.down == "none"


#: the name this had when Horovod was the only engine
is_horovod_baseline = is_dense_baseline


def make_compression(cfg: TrainConfig, world_size: int, rank: int,
                     steps_per_epoch_: Optional[int] = None):
    """``hvdcomp.Compression.algorithm(name, up=, down=, **hyperparameters)`` for ``cfg``.

    Each method fills what the training run knows and the user need not type, in its own
    ``train_options`` hook (:mod:`hvdcomp.algorithms.registry`): LIEC's ``period``; DGC's
    ``steps_per_epoch`` (its sparsity warm-up counts epochs); EF21-PP's ``rank`` and ``seed``
    (the shared draw of participants); EF21-W's (and EF21-W-PP's) ``rank`` and, when not
    given, equal ``smoothness`` constants. The CLI calls this before the engine starts too, so
    bad hyperparameters fail before any rank starts."""
    from hvdcomp.algorithms import registry
    from hvdcomp.compression import Compression
    options = registry.method(cfg.algorithm).train_options(cfg, world_size, rank,
                                                            steps_per_epoch_)
    return Compression.algorithm(cfg.algorithm, up=cfg.up, down=cfg.down, **options)


class DistributedStep:
    """The training loop's view of a distributed optimizer: zero_grad, step (timed), lr,
    counters and state. The dense baseline reports no bytes: for it they are computed from the
    ring allreduce it runs ((N−1)/N of the dense gradient each way per step)."""

    def __init__(self, optimizer, gradient_bytes: int, world_size: int, horovod_baseline: bool):
        self.optimizer = optimizer
        self.gradient_bytes = gradient_bytes
        self.world_size = world_size
        self.horovod_baseline = horovod_baseline
        self._measured = {name: 0.0 for name in COUNTERS}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def training_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return labels

    def describe(self) -> Dict[str, Any]:
        from .uncompressed import message_compression   # per uplink message, after a step
        return {} if self.horovod_baseline else message_compression(self.optimizer)

    def step(self) -> None:
        start = time.perf_counter()
        # waits for the exchange the backward hooks started (hvdcomp's own waits are guarded
        # per collective; the dense baseline is guarded as a whole)
        guard = stall.waiting("the dense gradient allreduce") if self.horovod_baseline else \
            contextlib.nullcontext()
        with guard:
            self.optimizer.synchronize()
        waited = time.perf_counter() - start
        if self.horovod_baseline:
            self._measured["time_comm"] += waited
            ring_share = ring_allreduce_mean(self.gradient_bytes, self.world_size)
            self._measured["bytes_up"] += ring_share
            self._measured["bytes_down"] += ring_share
        with self.optimizer.skip_synchronize():
            self.optimizer.step()

    def counters(self) -> Dict[str, float]:
        """Cumulative bytes sent per rank and seconds spent, since this process started."""
        if self.horovod_baseline:
            return dict(self._measured)
        stats = getattr(self.optimizer, "stats", None)

        def read(name):
            value = stats.get(name, 0.0) if isinstance(stats, dict) else getattr(stats, name, 0.0)
            return float(value)
        return {name: read(name) for name in COUNTERS}

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
