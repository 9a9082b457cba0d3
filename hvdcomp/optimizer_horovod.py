"""Horovod's own gradient exchange, for compressions with Horovod's ``Compressor`` interface.

``Compression.none``, ``Compression.fp16``, ``Compression.randomk(ratio)`` and any user object
with ``compress(tensor) -> (tensor, ctx)`` and ``decompress(tensor, ctx)`` are applied exactly as
``horovod.torch.DistributedOptimizer`` 0.28.1 applies them: per parameter, as soon as its gradient
is ready, ``compress`` → in-place ``allreduce`` (``op``, ``gradient_predivide_factor`` as pre- and
post-scale, ``process_set``) → ``decompress`` → ``p.grad.set_``; Horovod's ``groups`` become
grouped allreduces; sparse gradients go through ``sparse_allreduce`` unless ``sparse_as_dense``.
Over Horovod the very same ``horovod.torch`` calls are made, so with ``Compression.none`` the
parameters equal Horovod's to the last bit. Over another communicator (the in-process simulator)
the allreduce is the communicator's and the scale factors are applied around it.

Bytes are counted from the compressed tensors as a ring allreduce sends them (as for the
exchange's allreduces): reduce-scatter half as uplink, allgather half as downlink.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from .comm.base import scale_like_horovod
from .exchange_ledger import ring_allreduce_bytes
from .optimizer_buckets import ExchangeStats


class HorovodReducer:
    """Per-parameter allreduce of ``compression.compress(p.grad)`` (see the module docstring)."""

    has_error_feedback = False

    def __init__(self, compression, comm, names: Dict[Any, str], requires_update: List[Any], *,
                 op: str, predivide: float, groups: Optional[List[Tuple[Any, ...]]],
                 sparse_as_dense: bool, prefix: str):
        self.compression = compression
        self.comm = comm
        self.names = names
        self.requires_update = requires_update      # in a rank-independent order
        self.op = op
        self.predivide = predivide
        self.sparse_as_dense = sparse_as_dense
        self.prefix = prefix
        self.groups = groups
        self._group_of = {p: g for g in (groups or []) for p in g}
        self._group_counts = {g: 0 for g in (groups or [])}
        self._handles: Dict[Any, Tuple[Any, Any]] = {}
        self._backend = _backend(comm)
        self.stats = ExchangeStats()

    # --- the optimizer's hooks call these ------------------------------------------------------
    def ready(self, p) -> None:
        if self.groups is not None:
            group = self._group_of[p]
            self._group_counts[group] += 1
            if self._group_counts[group] == len(group):
                self._handles[group] = self._grouped_async(group)
                for member in group:  # drop the placeholders of earlier passes
                    self._handles.pop(member, None)
                self._group_counts[group] = 0
            return
        self._handles[p] = self._allreduce_async(p)

    def pending(self, p) -> None:
        """A backward pass of ``p`` that is not its last before the step (Horovod records it)."""
        self._handles[p] = (None, None)

    def in_flight(self) -> bool:
        return bool(self._handles)

    def before_step(self) -> None:
        pass

    def reset(self) -> None:
        self._handles = {}
        self._group_counts = {g: 0 for g in self._group_counts}

    # --- launching -----------------------------------------------------------------------------
    def _allreduce_async(self, p):
        began = time.perf_counter()
        if p.grad is None:
            # Horovod: another rank may have a gradient for p (dynamic graphs), so zeros travel
            p.grad = p.data.new(p.size()).zero_()
        name = f"{self.prefix}.{self.names[p]}"
        tensor = p.grad
        if tensor.is_sparse:
            if not self.sparse_as_dense:
                return self._sparse_async(p, name)
            tensor = tensor.to_dense()
        compressed, ctx = self.compression.compress(tensor)
        if self.op == "average":
            # Horovod splits the average around the sum; the backend adds 1/size to the post-scale
            pre, post = 1.0 / self.predivide, self.predivide
        else:
            pre, post = 1.0, 1.0
        self._count(compressed)
        handle = self._backend.allreduce_(compressed, name, self.op, pre, post)
        self.stats.time_compress += time.perf_counter() - began
        return handle, ctx

    def _grouped_async(self, group):
        # Horovod 0.28.1 applies no pre/post-scale to grouped allreduces: neither do we
        compressed, ctxs = zip(*[self.compression.compress(p.grad) for p in group])
        for tensor in compressed:
            self._count(tensor)
        name = f"{self.prefix}.{self.names[group[0]]}"
        return self._backend.grouped_allreduce_(list(compressed), name, self.op), ctxs

    def _sparse_async(self, p, name):
        grad = p.grad.coalesce()
        nbytes = grad.values().numel() * grad.values().element_size() \
            + grad.indices().numel() * grad.indices().element_size()
        self.stats.bytes_up += (self.comm.size - 1) * nbytes   # an allgather of the entries
        return self._backend.sparse_allreduce(p.grad, name, self.op), None

    def _count(self, tensor: torch.Tensor) -> None:
        up, down = ring_allreduce_bytes(tensor.numel(), tensor.element_size(), self.comm.size,
                                        self.comm.rank)
        self.stats.bytes_up += up
        self.stats.bytes_down += down

    # --- finishing -----------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Horovod's ``synchronize``: start what the hooks did not, wait, decompress, set grads."""
        began = time.perf_counter()
        completed = set()
        for key in self._handles:
            completed.update(key) if isinstance(key, tuple) else completed.add(key)
        # rank-independent order (Horovod iterates a set here; the order of named collectives
        # does not matter to Horovod, but a shared-seed compressor draws per call)
        for p in self.requires_update:
            if p not in completed:
                self._handles[p] = self._allreduce_async(p)
        for key, (handle, _) in list(self._handles.items()):
            if handle is None:
                self._handles[key] = self._allreduce_async(key)
        for key, (handle, ctx) in self._handles.items():
            if isinstance(key, tuple):
                outputs = self._backend.wait(handle)
                for p, output, member_ctx in zip(key, outputs, ctx):
                    p.grad.set_(self.compression.decompress(output, member_ctx))
            else:
                self._finish_one(key, handle, ctx)
        self._handles.clear()
        self._group_counts = {g: 0 for g in self._group_counts}
        self.stats.time_comm += time.perf_counter() - began
        self.stats.rounds += 1

    def _finish_one(self, p, handle, ctx) -> None:
        output = handle() if callable(handle) else self._backend.wait(handle)
        if p.grad.is_sparse:
            aggregated = self.compression.decompress(output, ctx)
            if not aggregated.is_sparse:
                aggregated = aggregated.to_sparse()  # sparse_as_dense: sparse again (Horovod)
            p.grad.zero_().add_(aggregated)
        else:
            p.grad.set_(self.compression.decompress(output, ctx))


def _backend(comm):
    from .comm.horovod import HorovodCommunicator
    if isinstance(comm, HorovodCommunicator):
        return _HorovodBackend(comm.hvd, comm.process_set)
    return _CommBackend(comm)


class _HorovodBackend:
    """The ``horovod.torch`` calls Horovod's optimizer makes, on the communicator's process set."""

    def __init__(self, hvd, process_set):
        self.hvd, self.process_set = hvd, process_set
        self.ops = {"average": hvd.Average, "sum": hvd.Sum}

    def allreduce_(self, tensor, name, op, pre, post):
        return self.hvd.allreduce_async_(tensor, name=name, op=self.ops[op], prescale_factor=pre,
                                         postscale_factor=post, process_set=self.process_set)

    def grouped_allreduce_(self, tensors, name, op):
        return self.hvd.grouped_allreduce_async_(tensors, name=name, op=self.ops[op],
                                                 process_set=self.process_set)

    def sparse_allreduce(self, tensor, name, op):
        return self.hvd.sparse_allreduce_async(tensor, name=name, op=self.ops[op],
                                               process_set=self.process_set)

    def wait(self, handle):
        return self.hvd.synchronize(handle)


class _CommBackend:
    """The same over any :class:`hvdcomp.comm.Communicator` (the simulator): the communicator's
    allreduce, with the scale factors applied around it in the tensor's dtype."""

    def __init__(self, comm):
        self.comm = comm

    def allreduce_(self, tensor, name, op, pre, post):
        if pre != 1.0:
            tensor = scale_like_horovod(tensor.clone(), pre)
        if post == 1.0:
            return self.comm.allreduce_async(tensor, name, op)
        inner = self.comm.allreduce_async(tensor, name, "sum")
        factor = post / self.comm.size if op == "average" else post
        return _Then(inner, lambda out: scale_like_horovod(out, factor))

    def grouped_allreduce_(self, tensors, name, op):
        inner = [self.comm.allreduce_async(t, f"{name}.{i}", op) for i, t in enumerate(tensors)]
        return _Then(inner, lambda outs: outs)

    def sparse_allreduce(self, tensor, name, op):
        raise ValueError(f"{name}: a sparse gradient (nn.Embedding(sparse=True)) needs Horovod's "
                         "sparse allreduce, which this communicator does not have; pass "
                         "sparse_as_dense=True")

    def wait(self, handle):
        return handle.wait()


class _Then:
    """A handle (or list of handles) whose result goes through ``then``."""

    def __init__(self, inner, then):
        self.inner, self.then = inner, then

    def wait(self):
        if isinstance(self.inner, list):
            return self.then([h.wait() for h in self.inner])
        return self.then(self.inner.wait())
