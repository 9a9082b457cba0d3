"""The training loop's distributed optimizer: which one runs, and the one adapter to it.

The only code that knows which distributed optimizer runs is :func:`build_distributed_optimizer`:

* ``psgd`` with ``none`` both ways (the dense baseline, :func:`is_dense_baseline`): on the
  Horovod engine Horovod's own ``hvd.DistributedOptimizer`` (ring allreduce of the dense gradient,
  fused by Horovod), on the torch engine :class:`.dense.AllreduceOptimizer` (one allreduce average
  per gradient through the communicator, the arithmetic of Horovod's ``Average``);
* ``monna``: :class:`.robust_step.MoNNAStep` over the communicator;
* everything else: ``hvdcomp.DistributedOptimizer`` over the engine's communicator, with the
  compression of :func:`make_compression`. It averages LIEC-SGD's models itself in ``step()``.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Optional

import torch

from .. import stall
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
    if cfg.algorithm == "monna":
        from .robust_step import MoNNAStep
        return MoNNAStep(model, cfg, comm)
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

    Fills what the training run knows and the user need not type: LIEC's ``period``; DGC's
    ``steps_per_epoch`` (its sparsity warm-up counts epochs); EF21-PP's ``rank`` and ``seed``
    (the shared draw of participants); EF21-W's (and EF21-W-PP's) ``rank`` and, when not
    given, equal ``smoothness`` constants (uniform weights: EF21-W then equals EF21; pass
    ``--algorithm-option smoothness=[L_1,...,L_N]`` for per-worker constants). The CLI calls
    this before the engine starts too, so bad hyperparameters fail before any rank starts."""
    from hvdcomp.compression import Compression
    options = dict(cfg.algorithm_options)
    if cfg.algorithm == "liec":
        options.setdefault("period", cfg.period)
    if cfg.algorithm == "dgc" and steps_per_epoch_ is not None:
        options.setdefault("steps_per_epoch", steps_per_epoch_)
    if cfg.algorithm == "dgc" and options.get("per_layer", True) and cfg.pattern != "allgather":
        raise ValueError(f"per-layer top-k (the paper's, the default) needs the whole bucket, "
                         f"i.e. --pattern allgather, not {cfg.pattern!r}; pass "
                         "--algorithm-option per_layer=false to select per bucket or chunk")
    if cfg.algorithm in ("ef21w", "ef21wpp"):
        options.setdefault("smoothness", [1.0] * world_size)
        options.setdefault("rank", rank)
    if cfg.algorithm in ("ef21pp", "ef21wpp"):
        # EF21-PP's draw of the participating workers: every rank knows its rank and the seed
        options.setdefault("rank", rank)
        options.setdefault("seed", cfg.seed)
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
            ring_share = (self.world_size - 1) / self.world_size * self.gradient_bytes
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
