"""``hvdcomp.DistributedOptimizer``: Horovod's optimizer wrapper, with a compressed exchange.

It behaves like ``horovod.torch.DistributedOptimizer`` (same arguments, ``synchronize()``,
``skip_synchronize()``, ``zero_grad()`` guard, ``backward_passes_per_step``), and differs inside:

* gradients are fused into **buckets** (``bucket_bytes``, default Horovod's 64 MiB fusion
  threshold) in a rank-independent order: reversed ``named_parameters``, which is roughly the
  order backward produces them;
* a bucket's **uplink** is launched from a post-accumulate-grad hook as soon as its last gradient
  is ready, so communication overlaps the rest of backward; ``synchronize()`` finishes the
  **downlink** of every bucket, in bucket order, and writes the update into ``p.grad``;
* every collective has a deterministic name (``hvdcomp.<bucket>.<phase>.<round>``), so ranks whose
  hooks fire in different orders pair the right tensors and never deadlock;
* tensors smaller than ``small_tensor_bytes`` (biases, norms) go uncompressed through an allreduce:
  compressing them saves nothing and costs accuracy;
* LIEC-SGD's exact rounds: the exchange sends exact gradients, and ``step()`` first averages the
  parameters exactly (models drift apart between those rounds by design);
* ``state_dict()`` carries this rank's error-feedback state (``"hvdcomp"`` entry), so a checkpoint
  that collects every rank's state dict resumes exactly.

Weight decay and momentum stay in the wrapped optimizer: they act on the exchanged update, never
on what is compressed (LIEC-SGD's code does the same).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from .compression import AlgorithmCompression, Compression, is_stateful
from .exchange import Exchange

#: Horovod's default fusion threshold
DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024
#: tensors below this many bytes travel uncompressed (a 1024-element fp32 bias or norm)
DEFAULT_SMALL_TENSOR_BYTES = 4096


@dataclass
class _Bucket:
    key: str
    params: List[torch.nn.Parameter]
    exchange: Exchange
    pending: int = 0                  # params whose gradient is not ready yet this step
    handle: Any = None

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclass
class ExchangeStats:
    """Cumulative per-rank figures, read by ``hvdcomp train`` and the benchmarks."""
    bytes_up: int = 0
    bytes_down: int = 0
    time_compress: float = 0.0   # seconds spent in start() (compress + launch)
    time_comm: float = 0.0       # seconds spent in finish() (wait + decode + server step)
    rounds: int = 0


class _DistributedOptimizer(torch.optim.Optimizer):
    # Mixed into the user's optimizer class by DistributedOptimizer(), as Horovod does, so
    # isinstance(opt, torch.optim.SGD) still holds and the update rule is the user's.
    def __init__(self, params, named_parameters, compression, backward_passes_per_step,
                 bucket_bytes, small_tensor_bytes, comm, pattern):
        super(self.__class__, self).__init__(params)
        if backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be ≥ 1")
        self.backward_passes_per_step = backward_passes_per_step
        self._comm = comm
        named = _named_parameters(self.param_groups, named_parameters)
        trainable = [(n, p) for n, p in named if p.requires_grad]

        if not is_stateful(compression):
            # A Horovod-style stateless compressor, or none: plain averaging (P-SGD) whose
            # payload is the gradient itself; an hvdcomp cast compressor carries the precision.
            spec = "fp16" if compression is Compression.fp16 else "none"
            compression = AlgorithmCompression("psgd", up=spec)
        self.algorithm = compression.build()
        linear = self.algorithm.up.linear and self.algorithm.down.linear and \
            self.algorithm.name == "psgd"
        self._exchange = Exchange(self.algorithm, comm,
                                  pattern=pattern or ("allreduce" if linear else "two_phase"))
        from .algorithms import make_algorithm
        self._dense_exchange = Exchange(make_algorithm("psgd"), comm, pattern="allreduce")

        small = [(n, p) for n, p in trainable if p.numel() * p.element_size() < small_tensor_bytes]
        large = [(n, p) for n, p in trainable if p.numel() * p.element_size() >= small_tensor_bytes]
        self._buckets: List[_Bucket] = (
            _fuse(large, bucket_bytes, "b", self._exchange)
            + _fuse(small, bucket_bytes, "dense", self._dense_exchange))
        self._bucket_of = {id(p): b for b in self._buckets for p in b.params}
        self._delay = {id(p): backward_passes_per_step for _, p in trainable}
        self._synchronized = False
        self._should_synchronize = True
        self._average_before_step = False
        self.stats = ExchangeStats()
        for exchange in (self._exchange, self._dense_exchange):
            keys = {b.key: (b.numel, b.params[0].dtype) for b in self._buckets
                    if b.exchange is exchange}
            exchange.prepare(keys)  # every rank checks the others' settings before any step
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                       for _, p in trainable]

    # --- hooks and the exchange ----------------------------------------------------------------
    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if self._delay[id(p)] <= 0:
            raise RuntimeError(
                "gradients were computed more than backward_passes_per_step times before "
                "step()/synchronize(); raise backward_passes_per_step to accumulate locally")
        self._delay[id(p)] -= 1
        if self._delay[id(p)] == 0:
            bucket = self._bucket_of[id(p)]
            bucket.pending -= 1
            if bucket.pending == 0:
                self._start(bucket)

    def _start(self, bucket: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        flat = torch.cat([g.reshape(-1) for g in grads]) if len(grads) > 1 else grads[0].reshape(-1)
        began = time.perf_counter()
        bucket.handle = bucket.exchange.start(bucket.key, flat)
        self.stats.time_compress += time.perf_counter() - began

    def _begin_step(self) -> None:
        for bucket in self._buckets:
            bucket.pending = len(bucket.params)
            bucket.handle = None

    def synchronize(self) -> None:
        """Finish every bucket's exchange and write the updates into ``p.grad``."""
        # Buckets whose hook did not fire (parameters without a gradient on this rank this
        # step) are started now with zeros, so every rank runs the same collectives.
        for bucket in self._buckets:
            if bucket.handle is None:
                self._start(bucket)
        self._average_before_step = self._exchange.is_sync_step()
        began = time.perf_counter()
        for bucket in self._buckets:
            update = bucket.exchange.finish(bucket.handle)
            offset = 0
            for p in bucket.params:
                n = p.numel()
                piece = update[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = piece.clone()
                else:
                    p.grad.copy_(piece)
                offset += n
        self.stats.time_comm += time.perf_counter() - began
        for exchange in (self._exchange, self._dense_exchange):
            exchange.end_round()
        self.stats.bytes_up = self._exchange.bytes_up + self._dense_exchange.bytes_up
        self.stats.bytes_down = self._exchange.bytes_down + self._dense_exchange.bytes_down
        self.stats.rounds += 1
        for key in self._delay:
            self._delay[key] = self.backward_passes_per_step
        self._begin_step()
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """For ``synchronize(); clip gradients; with skip_synchronize(): step()``."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without a backward pass since the last "
                              "synchronize(); use `with optimizer.skip_synchronize():` after an "
                              "explicit synchronize()")
            self.synchronize()
        self._synchronized = False
        if self._average_before_step:
            # LIEC-SGD's exact round: the local models drifted apart by the workers' own
            # compression errors; average them exactly, then apply the exact update.
            params = [p for b in self._buckets for p in b.params]
            self._exchange.average_parameters(params)
            self._average_before_step = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if any(b.handle is not None for b in self._buckets):
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but "
                                 "before optimizer.step() or optimizer.synchronize(); this would "
                                 "race with the exchange in flight")
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        state = super(self.__class__, self).state_dict()
        state["hvdcomp"] = {"rank": self._comm.rank, "size": self._comm.size,
                            "algorithm": self.algorithm.state_dict(),
                            "dense": self._dense_exchange.algorithm.state_dict(),
                            "bytes": (self._exchange.bytes_up, self._exchange.bytes_down,
                                      self._dense_exchange.bytes_up, self._dense_exchange.bytes_down)}
        return state

    def load_state_dict(self, state_dict, reset_error_feedback: bool = False):
        """Restore the wrapped optimizer and this rank's error-feedback state. A checkpoint from
        another world size fails unless ``reset_error_feedback=True`` (errors start at zero)."""
        state_dict = dict(state_dict)
        ours = state_dict.pop("hvdcomp", None)
        super(self.__class__, self).load_state_dict(state_dict)
        if ours is None or reset_error_feedback:
            return
        if ours["size"] != self._comm.size or ours["rank"] != self._comm.rank:
            raise ValueError(
                f"checkpoint holds the error-feedback state of rank {ours['rank']} of "
                f"{ours['size']}, this is rank {self._comm.rank} of {self._comm.size}: resume with "
                f"{ours['size']} ranks, or pass reset_error_feedback=True to start the errors at zero")
        self.algorithm.load_state_dict(ours["algorithm"])
        self._dense_exchange.algorithm.load_state_dict(ours["dense"])
        (self._exchange.bytes_up, self._exchange.bytes_down,
         self._dense_exchange.bytes_up, self._dense_exchange.bytes_down) = ours["bytes"]
        self.stats.bytes_up = self._exchange.bytes_up + self._dense_exchange.bytes_up
        self.stats.bytes_down = self._exchange.bytes_down + self._dense_exchange.bytes_down

    @property
    def exchange(self) -> Exchange:
        return self._exchange


def _named_parameters(param_groups, named_parameters):
    all_params = [p for g in param_groups for p in g["params"]]
    if named_parameters is None:
        return [(f"param.{i}", p) for i, p in enumerate(all_params)]
    named = list(named_parameters)
    if any(not isinstance(item, tuple) or len(item) != 2 for item in named):
        raise ValueError("named_parameters must be (name, parameter) pairs, usually "
                         "model.named_parameters()")
    names = [n for n, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"parameter names must be unique; duplicated: {', '.join(duplicates)}")
    named_ids = {id(p) for _, p in named}
    unnamed = [p for p in all_params if id(p) not in named_ids]
    if unnamed:
        raise ValueError(f"{len(unnamed)} optimizer parameter(s) are missing from "
                         "named_parameters; pass model.named_parameters() of the whole model")
    in_optimizer = {id(p) for p in all_params}
    return [(n, p) for n, p in named if id(p) in in_optimizer]


def _fuse(named, bucket_bytes, prefix, exchange) -> List[_Bucket]:
    """Fill buckets in reversed registration order (backward's order), by dtype and device."""
    buckets: List[_Bucket] = []
    current: Dict[Any, _Bucket] = {}
    for _, p in reversed(named):
        group = (p.dtype, p.device)
        bucket = current.get(group)
        size = p.numel() * p.element_size()
        if bucket is None or (bucket.numel * p.element_size() + size > bucket_bytes and bucket.params):
            bucket = _Bucket(key=f"{prefix}{len(buckets)}", params=[], exchange=exchange)
            buckets.append(bucket)
            current[group] = bucket
        bucket.params.append(p)
    for bucket in buckets:
        bucket.pending = len(bucket.params)
    return buckets


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None,
                         compression: Any = None, backward_passes_per_step: int = 1,
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                         small_tensor_bytes: int = DEFAULT_SMALL_TENSOR_BYTES,
                         comm=None, pattern: Optional[str] = None):
    """Wrap ``optimizer`` so that ``step()`` applies the compressed-exchanged gradient.

    Arguments as in ``horovod.torch.DistributedOptimizer``, plus:
      compression: ``hvdcomp.Compression.liec("sign")`` and friends, or a stateless Horovod
        compressor (``Compression.none``/``fp16``: plain averaging, bit-identical to Horovod's).
      bucket_bytes: fusion buffer size; a bucket's exchange starts when its last gradient is ready.
      small_tensor_bytes: tensors smaller than this travel uncompressed through an allreduce.
      comm: a :class:`hvdcomp.comm.Communicator` (default: Horovod's, after ``hvd.init()``).
      pattern: ``"two_phase"`` (sharded server, default), ``"allgather"`` or ``"allreduce"``.
    """
    if comm is None:
        from .comm import HorovodCommunicator
        comm = HorovodCommunicator()
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, compression or Compression.none,
               backward_passes_per_step, bucket_bytes, small_tensor_bytes, comm, pattern)
