"""The bucketed, error-feedback exchange behind ``hvdcomp.DistributedOptimizer`` for hvdcomp's
own algorithms (``Compression.liec(...)``, ``.memsgd``, ``Compression.algorithm(...)``).

* gradients are fused into **buckets** (``bucket_bytes``, default DDP's 25 MiB with a first
  bucket of 1 MiB, or Horovod's ``groups``) in a rank-independent order: reversed
  ``named_parameters``, roughly the order backward produces them;
* a bucket's **uplink** starts from the optimizer's gradient hook once its last gradient is
  ready and every bucket before it has started: buckets start in index order whatever order the
  hooks fire in (as DDP's), so ranks launch collectives in the same order, which engines that
  pair by launch order (torch.distributed) need; communication still overlaps backward;
  :meth:`BucketReducer.synchronize` finishes the **downlink** of every bucket, in bucket order,
  and writes the update into ``p.grad``, pipelined (:func:`hvdcomp.exchange.finish_in_order`):
  bucket k+1's server steps run and its downlink is launched before bucket k's downlink is
  waited for and decoded, so each bucket's downlink travels while the next is served;
* a bucket of several tensors keeps its gradients in one buffer, and each ``p.grad`` becomes a
  view into it (DDP's ``gradient_as_bucket_view``): the update is decoded over that buffer, so
  ``p.grad`` holds it with no copy back, and a rank keeps one model of gradients, not two.  As
  with Horovod's in-place allreduce, ``p.grad`` holds no meaningful value between backward and
  ``synchronize``;
* tensors smaller than ``small_tensor_bytes`` (biases, norms) go uncompressed through an
  allreduce: compressing them saves nothing and costs accuracy;
* LIEC-SGD's exact rounds: the exchange sends exact gradients, and :meth:`before_step` averages
  the parameters exactly (models drift apart between those rounds by design).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from .compressors._wire import allocate
from .exchange import Exchange, finish_in_order


@dataclass
class Bucket:
    key: str
    params: List[torch.nn.Parameter]
    exchange: Exchange
    pending: int = 0                  # params whose gradient is not ready yet this step
    handle: Any = None
    #: the bucket's gradients side by side, reused every round (not state): the exchange also
    #: decodes the update into it (``Exchange.start(update_into=)``), so a round allocates no
    #: bucket-sized tensor (fresh ones cost page faults and fragment the heap: peak RSS)
    flat: Optional[torch.Tensor] = None
    #: each parameter's slice of ``flat``, shaped like it: what ``p.grad`` is set to
    slots: List[torch.Tensor] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclass
class ExchangeStats:
    """Cumulative per-rank figures, read by ``hvdcomp train`` and the benchmarks."""
    bytes_up: int = 0
    bytes_down: int = 0
    time_compress: float = 0.0   # seconds spent launching (compress + launch)
    time_comm: float = 0.0       # seconds spent in synchronize (wait + decode + server step)
    rounds: int = 0


class BucketReducer:
    """Exchanges the gradients of ``trainable`` (``[(name, p)]``) through ``algorithm``."""

    has_error_feedback = True
    #: finish the buckets pipelined (:func:`hvdcomp.exchange.finish_in_order`: bucket k+1's
    #: downlink is launched before bucket k's is decoded); False finishes them one by one.
    #: The same values either way (tests/test_overlap.py compares them bit for bit).
    overlap_downlink = True
    #: a several-tensor bucket's ``p.grad`` become views into its buffer (DDP's
    #: ``gradient_as_bucket_view``); False copies the gradients in and the update back out.
    #: The same values either way (tests/test_grad_views.py compares them bit for bit).
    grads_as_bucket_views = True

    def __init__(self, algorithm, comm, trainable, *, bucket_bytes: int, small_tensor_bytes: int,
                 pattern: Optional[str], groups: Optional[List[Sequence[torch.Tensor]]],
                 op_sum: bool, sparse_as_dense: bool, names: Dict[Any, str], prefix: str,
                 first_bucket_bytes: Optional[int] = None):
        from .algorithms import make_algorithm

        self.algorithm = algorithm
        self.comm = comm
        self.names = names
        self.op_sum = op_sum
        self.sparse_as_dense = sparse_as_dense
        self.exchange = Exchange(algorithm, comm, pattern=pattern or _default_pattern(algorithm))
        self.dense_exchange = Exchange(make_algorithm("psgd"), comm, pattern="allreduce")
        for exchange in (self.exchange, self.dense_exchange):
            exchange.name_prefix = prefix  # names unique per optimizer, stable across steps
        self.buckets = _make_buckets(trainable, groups, bucket_bytes, small_tensor_bytes,
                                     self.exchange, self.dense_exchange, first_bucket_bytes)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._slot_index = {id(p): i for b in self.buckets for i, p in enumerate(b.params)}
        if hasattr(algorithm, "set_layout"):  # per-layer selection (DGC) needs the tensors
            for bucket in self.buckets:
                if bucket.exchange is self.exchange:
                    algorithm.set_layout(bucket.key, [(p.numel(), p.dim()) for p in bucket.params])
        if hasattr(algorithm, "set_shapes"):  # PowerSGD views each tensor as a matrix
            for bucket in self.buckets:
                if bucket.exchange is self.exchange:
                    algorithm.set_shapes(bucket.key, [tuple(p.shape) for p in bucket.params])
        self._average_before_step = False
        self.stats = ExchangeStats()
        for exchange in (self.exchange, self.dense_exchange):
            keys = {b.key: (b.numel, b.params[0].dtype) for b in self.buckets
                    if b.exchange is exchange}
            exchange.prepare(keys)  # every rank checks the others' settings before any step
        self._begin_step()

    # --- the optimizer's hooks call these ------------------------------------------------------
    def ready(self, p: torch.Tensor) -> None:
        """``p``'s gradient is complete for this step: start its bucket if it was the last, and
        every bucket after it that was only waiting for it (buckets start in index order)."""
        bucket = self._bucket_of[id(p)]
        grad = p.grad
        if (self.grads_as_bucket_views and bucket.slots and grad is not None
                and not grad.is_sparse and grad.dtype == bucket.flat.dtype
                and grad.device == bucket.flat.device):
            # into its slot now, not when the bucket starts: autograd's fresh gradient (after
            # zero_grad to None) is let go at once, so at most one is alive, not a bucket's
            self._into_slot(p, bucket.slots[self._slot_index[id(p)]])
        bucket.pending -= 1
        while (self._next_start < len(self.buckets)
               and self.buckets[self._next_start].pending == 0):
            self._start(self.buckets[self._next_start])
            self._next_start += 1

    def in_flight(self) -> bool:
        return any(b.handle is not None for b in self.buckets)

    def _start(self, bucket: Bucket) -> None:
        flat = self._gather(bucket)
        began = time.perf_counter()
        # params: in an exact round (LIEC-SGD) the exchange averages them in place at finish;
        # update_into: the algorithms are done with the gradient once start returns, so the
        # update may be decoded over it (with one parameter: over its own gradient, which the
        # update replaces anyway)
        bucket.handle = bucket.exchange.start(bucket.key, flat, params=bucket.params,
                                              update_into=flat)
        self.stats.time_compress += time.perf_counter() - began

    def _gather(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's gradients as one flat tensor: its buffer, each gradient copied into its
        slot unless it already is that slot (then nothing moves), and ``p.grad`` made the slot;
        a one-tensor bucket is its own gradient; mixed dtypes or devices, a fresh ``cat``."""
        params = bucket.params
        if len(params) == 1:
            return self._dense_grad(params[0]).reshape(-1)
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            return torch.cat([self._dense_grad(p).reshape(-1) for p in params])
        for p, slot in zip(params, _slots(bucket)):
            self._into_slot(p, slot)
        return bucket.flat

    def _into_slot(self, p: torch.Tensor, slot: torch.Tensor) -> None:
        """``p``'s gradient into its slot of the bucket's buffer, unless it is there already
        (then nothing moves), and ``p.grad`` made the slot."""
        grad = self._dense_grad(p)
        if grad.data_ptr() == slot.data_ptr():
            return                             # accumulated into the slot, or moved in its hook
        slot.copy_(grad)
        if self.grads_as_bucket_views and p.grad is grad and p.is_contiguous():
            p.grad = slot                      # later backward passes accumulate into it

    def _dense_grad(self, p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            return torch.zeros_like(p)
        if p.grad.is_sparse:
            if not self.sparse_as_dense:
                raise ValueError(
                    f"parameter {self.names.get(p, '?')!r} has a sparse gradient "
                    "(nn.Embedding(sparse=True)); hvdcomp's algorithms compress dense buckets: "
                    "pass sparse_as_dense=True (as with Horovod: the gradient is made dense, "
                    "exchanged, and made sparse again before step())")
            return p.grad.to_dense()
        return p.grad

    def _begin_step(self) -> None:
        self._next_start = 0
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)
            bucket.handle = None

    def synchronize(self) -> None:
        """Finish every bucket's exchange and write the updates into ``p.grad``."""
        # Buckets whose hook did not fire (parameters without a gradient on this rank this
        # step) are started now with zeros, so every rank runs the same collectives.
        for bucket in self.buckets:
            if bucket.handle is None:
                self._start(bucket)
        self._average_before_step = self.exchange.is_sync_step()
        began = time.perf_counter()
        started = [(bucket.exchange, bucket.handle) for bucket in self.buckets]
        updates = (finish_in_order(started) if self.overlap_downlink
                   else (exchange.finish(handle) for exchange, handle in started))
        for bucket, update in zip(self.buckets, updates):
            if self.op_sum:  # Horovod's op=Sum: the average times the number of ranks
                update = update.mul_(self.comm.size)
            self._write_grads(bucket, update)
        self.stats.time_comm += time.perf_counter() - began
        for exchange in (self.exchange, self.dense_exchange):
            exchange.end_round()
        self._read_bytes()
        self.stats.rounds += 1
        self._begin_step()

    def _write_grads(self, bucket: Bucket, update: torch.Tensor) -> None:
        offset = 0
        for i, p in enumerate(bucket.params):
            n = p.numel()
            piece = update[offset:offset + n].view_as(p)
            offset += n
            if p.grad is None and self.grads_as_bucket_views and bucket.slots \
                    and p.is_contiguous():
                p.grad = bucket.slots[i]       # no gradient this step: its slot takes the update
            if p.grad is None:
                p.grad = piece.clone()
            elif p.grad.is_sparse:  # sparse_as_dense: sparse again for the optimizer (Horovod)
                p.grad.zero_().add_(piece.to_sparse())
            elif p.grad.data_ptr() != piece.data_ptr():   # a one-tensor bucket decodes in place
                p.grad.copy_(piece)

    def _read_bytes(self) -> None:
        self.stats.bytes_up = self.exchange.bytes_up + self.dense_exchange.bytes_up
        self.stats.bytes_down = self.exchange.bytes_down + self.dense_exchange.bytes_down

    def before_step(self) -> None:
        if self._average_before_step:
            # LIEC-SGD's exact round: the local models drifted apart by the workers' own
            # compression errors; average them exactly, then apply the exact update.  The
            # buckets of the algorithm's exchange were averaged by their gradient's allreduce
            # (Exchange.start's params); the small dense tensors' buckets are averaged here.
            params = [p for b in self.buckets if b.exchange is not self.exchange
                      for p in b.params]
            if params:
                self.exchange.average_parameters(params)
            self._average_before_step = False

    def reset(self) -> None:
        """Horovod's load_state_dict drops the step in progress; an exchange in flight cannot be
        dropped (its collectives are posted), so that is refused."""
        if self.in_flight():
            raise RuntimeError("load_state_dict() was called while gradients are being "
                               "exchanged (after backward, before step()): load the checkpoint "
                               "before the first backward pass")
        self._begin_step()

    # --- error-feedback state ------------------------------------------------------------------
    @property
    def round(self) -> int:
        return self.algorithm.step

    def replicas_drift(self) -> bool:
        # algorithms with exact rounds (LIEC-SGD) let each rank's model drift in between: the
        # rank's own parameters are then part of its state, since rank 0's model is not its own
        from .algorithms.base import Algorithm
        return type(self.algorithm).is_sync_step is not Algorithm.is_sync_step

    def state_slice(self) -> Dict[str, Any]:
        """This rank's error-feedback state (worker errors, the server error of the chunks this
        rank owns, the round counter), its byte counters and, when replicas drift, its own
        parameters (restored by :meth:`load_slice` over the model loaded from rank 0's file)."""
        state = {"algorithm": self.algorithm.state_dict(),
                 "dense": self.dense_exchange.algorithm.state_dict(),
                 "bytes": (self.exchange.bytes_up, self.exchange.bytes_down,
                           self.dense_exchange.bytes_up, self.dense_exchange.bytes_down)}
        if self.replicas_drift():
            state["params"] = [p.detach().clone() for b in self.buckets for p in b.params]
        return state

    def load_slice(self, state: Dict[str, Any]) -> None:
        params = [p for b in self.buckets for p in b.params]
        if "params" in state:
            if [tuple(p.shape) for p in params] != [tuple(t.shape) for t in state["params"]]:
                raise ValueError("the checkpoint's parameters do not match this model's")
            with torch.no_grad():
                for p, saved in zip(params, state["params"]):
                    p.copy_(saved)
        self.algorithm.load_state_dict(state["algorithm"])
        self.dense_exchange.algorithm.load_state_dict(state["dense"])
        (self.exchange.bytes_up, self.exchange.bytes_down,
         self.dense_exchange.bytes_up, self.dense_exchange.bytes_down) = state["bytes"]
        self._read_bytes()

    def reset_error_feedback(self) -> None:
        """Errors at zero and the round counter at 0 (the same on every rank that calls it)."""
        for algorithm in (self.algorithm, self.dense_exchange.algorithm):
            algorithm.reset_state()


def _slots(bucket: Bucket) -> List[torch.Tensor]:
    """The bucket's buffer, cut into one slot per parameter, shaped like it (made on first use,
    and again if the parameters moved to another dtype or device)."""
    first = bucket.params[0]
    if bucket.flat is None or bucket.flat.dtype != first.dtype or \
            bucket.flat.device != first.device:
        bucket.flat = allocate(bucket.numel, first.dtype, first.device)
        bucket.slots, offset = [], 0
        for p in bucket.params:
            bucket.slots.append(bucket.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return bucket.slots


def _default_pattern(algorithm) -> str:
    """The pattern ``hvdcomp train`` uses for the algorithm (DGC: allgather, as in its paper);
    else allreduce for plain averaging of linear payloads, else the sharded two-phase server."""
    from .train.config import DEFAULT_PATTERN
    if algorithm.name in DEFAULT_PATTERN:
        return DEFAULT_PATTERN[algorithm.name]
    linear = algorithm.up.linear and algorithm.down.linear and algorithm.name == "psgd"
    return "allreduce" if linear else "two_phase"


def _make_buckets(trainable, groups, bucket_bytes, small_tensor_bytes, exchange,
                  dense_exchange, first_bucket_bytes=None) -> List[Bucket]:
    if groups is not None:
        return _group_buckets(trainable, groups, small_tensor_bytes, exchange, dense_exchange)
    small = [(n, p) for n, p in trainable if p.numel() * p.element_size() < small_tensor_bytes]
    large = [(n, p) for n, p in trainable if p.numel() * p.element_size() >= small_tensor_bytes]
    return (_fuse(large, bucket_bytes, "b", exchange, first_bucket_bytes)
            + _fuse(small, bucket_bytes, "dense", dense_exchange))


def _group_buckets(trainable, groups, small_tensor_bytes, exchange, dense_exchange):
    """Horovod's ``groups``: one bucket per group (parameters in no group: one bucket each)."""
    order = {id(p): i for i, (_, p) in enumerate(trainable)}
    buckets: List[Bucket] = []
    for group in groups:
        params = sorted((p for p in group if id(p) in order), key=lambda p: order[id(p)])
        if not params:
            continue
        if len({(p.dtype, p.device) for p in params}) > 1:
            raise ValueError("a group mixes parameters of different dtypes or devices; hvdcomp "
                             "fuses a group into one bucket, so keep each group to one dtype "
                             "and device")
        nbytes = sum(p.numel() * p.element_size() for p in params)
        dense = nbytes < small_tensor_bytes
        prefix, target = ("dense", dense_exchange) if dense else ("b", exchange)
        count = sum(1 for b in buckets if b.exchange is target)
        buckets.append(Bucket(key=f"{prefix}{count}", params=params, exchange=target))
    return buckets


def _fuse(named, bucket_bytes, prefix, exchange, first_bucket_bytes=None) -> List[Bucket]:
    """Fill buckets in reversed registration order (backward's order), by dtype and device; the
    first bucket holds at most ``first_bucket_bytes`` when given (its gradients are ready first,
    so a small one starts the uplink early, as DDP's first bucket)."""
    buckets: List[Bucket] = []
    current: Dict[Any, Bucket] = {}
    for _, p in reversed(named):
        group = (p.dtype, p.device)
        bucket = current.get(group)
        size = p.numel() * p.element_size()
        cap = bucket_bytes
        if first_bucket_bytes is not None and bucket is not None and bucket is buckets[0]:
            cap = min(bucket_bytes, first_bucket_bytes)
        if bucket is None or (bucket.numel * p.element_size() + size > cap and bucket.params):
            bucket = Bucket(key=f"{prefix}{len(buckets)}", params=[], exchange=exchange)
            buckets.append(bucket)
            current[group] = bucket
        bucket.params.append(p)
    return buckets
