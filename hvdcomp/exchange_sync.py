"""Exact rounds (LIEC-SGD every ``period`` rounds): in a round where
``algorithm.is_sync_step()`` holds, the exchange averages each bucket's gradient exactly and
gathers the server state (``algorithm.server_flush``, each chunk from its owner), and ``finish``
returns ``algorithm.sync_update(key, mean, flushed)``; the optimizer also averages the parameters
exactly (:func:`average_parameters`).

One dense collective, not two: when ``start`` is given the bucket's parameters (the optimizer
does), the gradient and the parameters travel in one allreduce of their concatenation, and
``finish`` writes the averaged parameters back in place. An allreduce average is elementwise, so
every value is the one the two separate allreduces gave whenever the library adds the ranks'
values in the same order for both layouts: always on two ranks and in the simulator
(tests/test_optimizer.py compares the optimizer with the two-collective reference bit for bit).
On three or more ranks MPI's allreduce may add an element's values in an order set by where it
sits in the buffer, so results agree to floating-point rounding
(tests/test_optimizer_ranks.py).  The server state still travels by its
own allgather of 1/N of the bucket (it is summed into the update, not averaged)."""
from __future__ import annotations

from typing import Iterable, List, Sequence

import torch

from .comm.base import Handle
from .compressors._wire import allocate
from .exchange_codec import chunk_bounds
from .exchange_rounds import ExchangeHandle


def start_sync(ex, key: str, flat: torch.Tensor,
               params: Sequence[torch.Tensor] = ()) -> ExchangeHandle:
    params = [p for p in params]
    # an exact round compresses nothing: the bucket's work buffers (C(g_i), a bucket) go back to
    # the allocator for the joint buffer, and the next compressed round allocates them again
    ex.buffers.discard(key)
    if params and all(p.dtype == flat.dtype and p.device == flat.device for p in params):
        pending = {"gradient": _launch_joint(ex, key, flat, params)}
    else:
        params = []
        pending = {"gradient": ex.comm.allreduce_async(flat, ex.name(key, "sync_grad"),
                                                       "average")}
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
    return ExchangeHandle(key, ex.round, "sync", flat.shape, flat.dtype, pending, params=params)


def _launch_joint(ex, key: str, flat: torch.Tensor, params: List[torch.Tensor]):
    """One allreduce average of [gradient, parameters...], reduced in place (a fresh buffer: an
    exact round comes once every ``period`` rounds, not worth keeping a buffer for; in place,
    because every bucket's joint buffer is in flight at once: Horovod's out-of-place allreduce
    added a second copy of twice the model, docs/benchmarks.md "Memory")."""
    numel = flat.numel() + sum(p.numel() for p in params)
    joint = allocate(numel, flat.dtype, flat.device)
    joint[:flat.numel()].copy_(flat)
    offset = flat.numel()
    for p in params:
        joint[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
        offset += p.numel()
    ex.ledger.count_ring_allreduce("sync", numel, flat.dtype)
    return ex.comm.allreduce_into_async(joint, ex.name(key, "sync"), "average")


def finish_sync(ex, handle: ExchangeHandle) -> torch.Tensor:
    averaged = handle.pending["gradient"].wait()
    flushed = handle.pending["server_error"].wait()
    numel = handle.shape.numel()
    offset = numel
    with torch.no_grad():
        for p in handle.context["params"]:
            p.copy_(averaged[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return ex.algorithm.sync_update(handle.key, averaged[:numel], flushed)


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
