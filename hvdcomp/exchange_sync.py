"""Exact rounds (LIEC-SGD every ``period`` rounds): in a round where
``algorithm.is_sync_step()`` holds, the exchange averages each bucket's gradient exactly and
gathers the server state (``algorithm.server_flush``, each chunk from its owner), and ``finish``
returns ``algorithm.sync_update(key, mean, flushed)``; the optimizer also averages the parameters
exactly (:func:`average_parameters`).

Memory: nothing of the bucket's size is allocated for the gradient. It is averaged in place in
the caller's ``update_into`` (the optimizer's bucket buffer), and the update is written there
too. Only the parameters are copied, into one buffer per bucket: they change only when
``finish`` writes the averages back, as in the uncompressed round, and their allreduce still
starts at ``start``, while backward runs.  These are two in-place allreduces per bucket,
launched together; Horovod fuses them into one collective.  An earlier version sent one
allreduce of the concatenation [gradient, parameters]; that buffer held a second copy of the
gradient, and every bucket's buffer was in flight at once: twice the model at the peak, not once
(docs/benchmarks.md, "Where the extra peak memory goes").

An allreduce average is elementwise, so every value is the one of separate collectives whenever
the library adds the ranks' values in the same order: always on two ranks and in the simulator
(tests/test_exchange_sync.py checks it bit for bit). On three or more ranks, MPI may add an
element's values in an order set by where it sits in the buffer, so results agree to
floating-point rounding (tests/test_optimizer_ranks.py).  The server state travels by its own
allgather of 1/N of the bucket (it is summed into the update, not averaged)."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch

from .comm.base import Handle
from .compressors._wire import allocate
from .exchange_codec import chunk_bounds
from .exchange_rounds import ExchangeHandle


def start_sync(ex, key: str, flat: torch.Tensor, params: Sequence[torch.Tensor] = (),
               target: Optional[torch.Tensor] = None) -> ExchangeHandle:
    """Launch the exact round of ``key``: the gradient averaged in place in ``target`` (the
    caller's ``update_into``; a fresh copy without one), ``params`` averaged in a buffer of
    their own, the server state allgathered."""
    params = list(params)
    if len({(p.dtype, p.device) for p in params}) > 1:   # before any collective is launched
        raise ValueError(f"bucket {key!r}: the parameters given to start() mix dtypes or "
                         "devices; an exact round averages them in one buffer, so give one "
                         "dtype and device per bucket (the optimizer's buckets are)")
    # an exact round compresses nothing: the bucket's work buffers (C(g_i), a bucket) go back to
    # the allocator, and the next compressed round allocates them again
    ex.buffers.discard(key)
    mean = allocate(flat.numel(), flat.dtype, flat.device) if target is None else target
    if mean.data_ptr() != flat.data_ptr():
        mean.copy_(flat)
    ex.ledger.count_ring_allreduce("sync_grad", mean.numel(), mean.dtype)
    pending = {"gradient": ex.comm.allreduce_into_async(mean, ex.name(key, "sync_grad"),
                                                        "average")}
    if params:
        pending["params"] = _launch_parameters(ex, key, params)
    flushed = ex.algorithm.server_flush(key)
    if ex.pattern == "two_phase":
        start, stop = chunk_bounds(flat.numel(), ex.size, ex.alignment)[ex.rank]
        if flushed is None:
            flushed = flat.new_zeros(stop - start)
        if flushed.numel() != stop - start:
            raise ValueError(f"bucket {key!r}: server_flush returned {flushed.numel()} "
                             f"elements for a chunk of {stop - start}")
        ex.ledger.count_allgather("sync_server_error", flushed.numel(), flushed.dtype)
        pending["server_error"] = ex.comm.allgather_async(flushed.to(flat.dtype),
                                                          ex.name(key, "sync_error"))
    else:  # replicated server state: every rank holds the whole bucket's
        local = flat.new_zeros(flat.numel()) if flushed is None else flushed
        pending["server_error"] = Handle.done(local)
    return ExchangeHandle(key, ex.round, "sync", flat.shape, flat.dtype, pending, params=params)


def _launch_parameters(ex, key: str, params: List[torch.Tensor]):
    """One allreduce average of the bucket's parameters side by side, reduced in place (a fresh
    buffer: an exact round comes once every ``period`` rounds, not worth keeping one; in place,
    because every bucket's buffer is in flight at once)."""
    joined = allocate(sum(p.numel() for p in params), params[0].dtype, params[0].device)
    offset = 0
    for p in params:
        joined[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
        offset += p.numel()
    ex.ledger.count_ring_allreduce("sync_params", joined.numel(), joined.dtype)
    return ex.comm.allreduce_into_async(joined, ex.name(key, "sync_params"), "average")


def finish_sync(ex, handle: ExchangeHandle) -> torch.Tensor:
    mean = handle.pending["gradient"].wait()
    flushed = handle.pending["server_error"].wait()
    if "params" in handle.pending:
        averaged, offset = handle.pending["params"].wait(), 0
        with torch.no_grad():
            for p in handle.context["params"]:
                p.copy_(averaged[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
    return ex.algorithm.sync_update(handle.key, mean, flushed)


def average_parameters(ex, tensors: Iterable[torch.Tensor]) -> None:
    """Replace every tensor, in place, by its exact average over ranks (dense allreduce)."""
    tensors = list(tensors)
    handles = [ex.comm.allreduce_async(t.detach(), ex.name(f"params{i}", "sync_params"),
                                       "average")
               for i, t in enumerate(tensors)]
    for tensor, handle in zip(tensors, handles):
        averaged = handle.wait()
        with torch.no_grad():
            tensor.copy_(averaged.reshape(tensor.shape))
        ex.ledger.count_ring_allreduce("sync_params", tensor.numel(), tensor.dtype)
