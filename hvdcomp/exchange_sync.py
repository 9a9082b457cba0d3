"""Exact rounds (LIEC-SGD every ``period`` rounds): in a round where
``algorithm.is_sync_step()`` holds, the exchange averages each bucket's gradient exactly and
gathers the server state (``algorithm.server_flush``, each chunk from its owner), and ``finish``
returns ``algorithm.sync_update(key, mean, flushed)``; the optimizer also averages the parameters
exactly (:func:`average_parameters`).

Memory: nothing of the bucket's size is allocated for the gradient. It is averaged in place in
the caller's ``update_into`` (the optimizer's bucket buffer), and the update is written there
too. The parameters are averaged in place as well, one allreduce each, launched by ``finish``:
they change only then, as in the uncompressed round.  Launched at ``start`` instead (until 30
Nov 2026) their allreduce overlapped backward, but it needed a copy of every bucket's parameters,
all in flight at once (the model).  In place at ``finish`` the process's peak, which is the
exact round's, was 10–25 MiB lower on ResNet-18 (medians of five runs), and the exact round at
1 Gbit/s took no measurably longer (docs/benchmarks.md, "Where the extra peak memory goes").
An earlier version still sent one allreduce of the concatenation [gradient, parameters], a
second copy of the gradient.

An allreduce average is elementwise, so every value is the one of separate collectives whenever
the library adds the ranks' values in the same order: always on two ranks and in the simulator
(tests/test_exchange_sync.py checks it bit for bit). On three or more ranks, MPI may add an
element's values in an order set by where it sits in the buffer, so results agree to
floating-point rounding (tests/test_optimizer_ranks.py).  The server state is summed into the
update, not averaged: each rank adds its chunk into its chunk of the averaged gradient, then
broadcasts that chunk in place (:func:`fold_server_chunks`).  Until 30 Nov 2026 the chunks were
allgathered into a bucket-sized tensor first, which was the exact round's peak."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from .comm.base import Handle
from .compressors._wire import allocate
from .exchange_codec import chunk_bounds
from .exchange_rounds import ExchangeHandle


def start_sync(ex, key: str, flat: torch.Tensor, params: Sequence[torch.Tensor] = (),
               target: Optional[torch.Tensor] = None) -> ExchangeHandle:
    """Launch the exact round of ``key``: the gradient averaged in place in ``target`` (the
    caller's ``update_into``; a fresh copy without one) and the server state allgathered;
    ``params`` are averaged in place by :func:`finish_sync`."""
    params = list(params)
    # an exact round compresses nothing: the bucket's work buffers (C(g_i), a bucket) go back to
    # the allocator, and the next compressed round allocates them again
    ex.buffers.discard(key)
    mean = allocate(flat.numel(), flat.dtype, flat.device) if target is None else target
    if mean.data_ptr() != flat.data_ptr():
        mean.copy_(flat)
    ex.ledger.count_ring_allreduce("sync_grad", mean.numel(), mean.dtype)
    pending = {"gradient": ex.comm.allreduce_into_async(mean, ex.name(key, "sync_grad"),
                                                        "average")}
    flushed = ex.algorithm.server_flush(key)
    if ex.pattern == "two_phase":
        start, stop = chunk_bounds(flat.numel(), ex.size, ex.alignment)[ex.rank]
        if flushed is None:
            flushed = flat.new_zeros(stop - start)
        if flushed.numel() != stop - start:
            raise ValueError(f"bucket {key!r}: server_flush returned {flushed.numel()} "
                             f"elements for a chunk of {stop - start}")
        # sent at finish, from its owner, as its chunk of the update (fold_server_chunks)
        ex.ledger.count_allgather("sync_server_error", flushed.numel(), flushed.dtype)
        pending["server_error"] = Handle.done(flushed.to(flat.dtype))
    else:  # replicated server state: every rank holds the whole bucket's
        local = flat.new_zeros(flat.numel()) if flushed is None else flushed
        pending["server_error"] = Handle.done(local)
    return ExchangeHandle(key, ex.round, "sync", flat.shape, flat.dtype, pending, params=params)


def finish_sync(ex, handle: ExchangeHandle) -> torch.Tensor:
    # the parameters' allreduces go first: they queue behind the gradient's, launched at start
    averaging = [_average_in_place(ex, handle.key, i, p)
                 for i, p in enumerate(handle.context["params"])]
    mean = handle.pending["gradient"].wait()
    flushed = handle.pending["server_error"].wait()
    if ex.pattern == "two_phase":
        update = fold_server_chunks(ex, handle.key, mean, flushed)
    else:
        update = ex.algorithm.sync_update(handle.key, mean, flushed)
    for wait in averaging:
        wait()
    return update


def fold_server_chunks(ex, key: str, mean: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The update ``sync_update(mean, e)`` over the whole bucket, where each rank holds only its
    own chunk of the server state ``e``: each rank computes its chunk of the update in ``mean``
    itself, then broadcasts it in place to the others, one broadcast per chunk.

    The allreduce left ``mean`` the same on every rank, and ``sync_update`` is elementwise, so
    every element is the one the whole-bucket call gives. The same bytes as an allgather of the
    server state, but no buffer of the bucket's size to gather it into."""
    bounds = chunk_bounds(mean.numel(), ex.size, ex.alignment)
    start, stop = bounds[ex.rank]
    chunk = mean[start:stop]
    folded = ex.algorithm.sync_update(key, chunk, own)
    if folded.data_ptr() != chunk.data_ptr():
        chunk.copy_(folded)
    sending = [ex.comm.broadcast_into_async(mean[a:b], owner, ex.name(key, f"sync_error.{owner}"))
               for owner, (a, b) in enumerate(bounds) if b > a]
    for handle in sending:
        handle.wait()
    return mean


def _average_in_place(ex, key: str, index: int, param: torch.Tensor):
    """Launch the average of one parameter over ranks, in place (through a contiguous copy for
    a tensor that is not contiguous); returns the wait, which leaves the average in ``param``."""
    data = param.detach()
    buffer = data if data.is_contiguous() else data.contiguous()
    ex.ledger.count_ring_allreduce("sync_params", buffer.numel(), buffer.dtype)
    handle = ex.comm.allreduce_into_async(buffer.view(-1), ex.name(key, f"sync_params.{index}"),
                                          "average")

    def wait() -> None:
        handle.wait()
        if buffer.data_ptr() != data.data_ptr():
            with torch.no_grad():
                data.copy_(buffer)
    return wait


def average_parameters(ex, tensors: Iterable[torch.Tensor]) -> None:
    """Replace every tensor, in place, by its exact average over ranks (one dense allreduce
    each, all launched before the first is waited for)."""
    for wait in [_average_in_place(ex, "params", i, t) for i, t in enumerate(tensors)]:
        wait()
