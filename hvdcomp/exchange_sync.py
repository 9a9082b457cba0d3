"""Exact rounds (LIEC-SGD every ``period`` rounds): in a round where
``algorithm.is_sync_step()`` holds, the exchange averages each bucket's gradient exactly and
gathers the server state (``algorithm.server_flush``, each chunk from its owner), and ``finish``
returns ``algorithm.sync_update(key, mean, flushed)``; the optimizer also averages the parameters
exactly (:func:`average_parameters`)."""
from __future__ import annotations

from typing import Iterable

import torch

from .comm.base import Handle
from .exchange_codec import chunk_bounds
from .exchange_rounds import ExchangeHandle


def start_sync(ex, key: str, flat: torch.Tensor) -> ExchangeHandle:
    pending = {"gradient": ex.comm.allreduce_async(flat, ex.name(key, "sync_grad"), "average")}
    ex.ledger.count_ring_allreduce("sync_grad", flat.numel(), flat.dtype)
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
    return ExchangeHandle(key, ex.round, "sync", flat.shape, flat.dtype, pending)


def finish_sync(ex, handle: ExchangeHandle) -> torch.Tensor:
    mean = handle.pending["gradient"].wait()
    flushed = handle.pending["server_error"].wait()
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
