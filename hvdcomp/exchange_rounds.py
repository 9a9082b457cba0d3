"""The round kinds of :class:`hvdcomp.exchange.Exchange`: how one bucket's bytes move in one
round, for each collective pattern (``two_phase``, ``allgather``, ``allreduce``).  Each kind is a
``start(ex, key, flat)`` that runs the worker steps and launches the uplink, and a
``finish(ex, handle)`` that waits, runs the server steps, and returns the worker's update; exact
rounds (LIEC-SGD) are in :mod:`hvdcomp.exchange_sync`.  ``ex`` is the exchange: its algorithm,
communicator, ledger, buffers, names and seeds.

The two-phase finish is also split in two halves (:data:`SPLIT_FINISHES`), so that an owner of
several buckets can launch the next bucket's downlink before decoding this one's
(:func:`hvdcomp.exchange.finish_in_order`): ``serve_two_phase`` waits for the uplink, runs the
server steps and *launches* the downlink allgather; ``receive_two_phase`` waits for it, decodes
it and runs ``worker_update``.  ``finish_two_phase`` is the two, back to back.  The other kinds
have no downlink collective (allgather, allreduce: the server steps run replicated) or keep
their own (exact rounds, PowerSGD's owned rounds) and finish in one step.

The two-phase round runs the steps an algorithm declares to be error feedback's residual
(``Algorithm.worker_residual``, ``server_residual``) fused with the compressor: x − C(x) is
written over x (:func:`hvdcomp.exchange_codec.residual_into`), and a "compensated" r_i stays in
``update_into`` with C(v) decoded onto it (with ``sign`` both ways, r_i is formed only then, in
C(v)'s pass: :func:`hvdcomp.exchange_codec.deferred_residual_chunks`); the values are those of
the steps as written, bit for bit (tests/test_fused_residual.py)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .comm.base import Handle
from .compressors._wire import allocate
from .exchange_codec import (chunk_bounds, decode_into, decode_mean_into,
                             deferred_residual_chunks, own_payload,
                             payload_nbytes, residual_chunks, residual_into, subtracts_in_pass,
                             roundtrip_chunks_into, roundtrip_into, server_bucket_norm, split,
                             summable_dtype)


class ExchangeHandle:
    """One bucket's exchange in flight: returned by :meth:`Exchange.start`, consumed by
    :meth:`Exchange.finish`."""

    def __init__(self, key: str, round_: int, kind: str, shape: torch.Size, dtype: torch.dtype,
                 pending: Dict[str, Handle], **context: Any):
        self.key = key
        self.round = round_
        self.kind = kind          # "two_phase" | "allgather" | "allreduce" | "sync"
        self.shape = shape
        self.dtype = dtype
        self.pending = pending
        self.context = context
        self.served = False       # the server half ran (Exchange.finish_server): downlink sent
        self.finished = False

    def __repr__(self) -> str:
        stage = "finished" if self.finished else "served" if self.served else "in flight"
        return f"<ExchangeHandle {self.key!r} round {self.round} {self.kind} {stage}>"


# --- the two-phase sharded server --------------------------------------------------------------
def start_two_phase(ex, key: str, flat: torch.Tensor,
                    update_into: Optional[torch.Tensor] = None) -> ExchangeHandle:
    algo, up = ex.algorithm, ex.uplink(key)
    bounds = chunk_bounds(flat.numel(), ex.size, ex.alignment)
    seeds = [ex.seed_for(key, "up", j) for j in range(len(bounds))]
    # p_i = g_i + e_i, added in the encoder's pass over e_i where the algorithm and the
    # compressor allow (Algorithm.worker_adds_gradient_to), else by worker_message
    error = _error_to_add_gradient_to(algo, up, key, flat, update_into)
    message = error if error is not None else algo.worker_message(key, flat)
    residual = _fused_worker_residual(algo, up, message, flat, update_into)
    deferred = (deferred_residual_chunks(up, algo.down, message, bounds)
                if residual == "compensated" else None)
    subtract = None
    if deferred is not None:
        # r_i = p_i − C(p_i) waits for the downlink: receive_two_phase writes
        # (p_i − C(p_i)) + C(v) over p_i in one pass, where two would write r_i, then add
        payloads = deferred
    elif residual:
        # p_i ← p_i − C(p_i) in the compressor's pass (Algorithm.worker_residual): the error
        # is in place in the algorithm's storage ("kept") or in update_into ("compensated")
        payloads, subtract = residual_chunks(up, message, bounds, _scratch(ex, message), seeds,
                                             addend=None if error is None else flat)
    else:
        # C(p_i), chunk by chunk, decoded straight into one buffer (no torch.cat)
        sent = _worker_sent_buffer(ex, key, message, update_into)
        payloads = roundtrip_chunks_into(up, message, bounds, sent, seeds)
    splits = [p.numel() for p in payloads]
    packed = torch.cat(payloads)   # before worker_sent: a payload may view the message
    if not residual:
        algo.worker_sent(key, message, sent)
    ex.ledger.count("uplink", up=sum(s for j, s in enumerate(splits) if j != ex.rank))
    pending = {"uplink": ex.comm.alltoall_async(packed, splits, ex.name(key, "up"))}
    if subtract is not None:
        subtract()     # p_i ← p_i − C(p_i) while the uplink travels (its payloads are copies)
    return ExchangeHandle(key, ex.round, "two_phase", flat.shape, flat.dtype, pending,
                          bounds=bounds, compensated=residual == "compensated",
                          own_payloads=deferred)


def _error_to_add_gradient_to(algo, up, key: str, flat: torch.Tensor,
                              update_into: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The algorithm's e_i (``worker_adds_gradient_to``), p_i not yet written over it, when
    this round adds g_i in the encoder's pass: when the residual on e_i is fused as "kept"
    (:func:`_fused_worker_residual`), which is where the addition happens
    (:func:`hvdcomp.exchange_codec.residual_chunks`).  None otherwise, and while e_i does not
    exist yet (the first round: ``worker_message`` creates it as g_i's copy)."""
    field = algo.worker_adds_gradient_to
    error = getattr(algo, field).get(key) if field is not None else None
    if error is None or _fused_worker_residual(algo, up, error, flat, update_into) != "kept":
        return None
    return error


def _fused_worker_residual(algo, up, message: torch.Tensor, flat: torch.Tensor,
                           update_into: Optional[torch.Tensor]) -> Optional[str]:
    """The algorithm's ``worker_residual`` when this round may fuse it, else None.  "kept":
    when the error is not the caller's gradient and ``up`` subtracts in its decoder's pass
    (otherwise the round decodes C(p_i) into ``update_into`` and costs no more).
    "compensated": when p_i is the caller's ``update_into``, so the residual, then the update,
    may be written there (instead of r_i in a bucket the exchange keeps)."""
    kind = algo.worker_residual
    if kind == "kept" and subtracts_in_pass(up) and not _same_storage(message, flat):
        return kind
    if (kind == "compensated" and update_into is not None
            and message.data_ptr() == update_into.data_ptr()
            and message.numel() == update_into.numel()):
        return kind
    return None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _scratch(ex, like: torch.Tensor):
    """``scratch(numel)``: ``numel`` elements of the exchange's scratch, one buffer shared by
    all buckets (each use ends inside one step of one bucket; nothing in flight views it),
    taken only when called."""
    return lambda numel: ex.buffers.shared("scratch", numel, like.dtype, like.device)


def _worker_sent_buffer(ex, key: str, message: torch.Tensor,
                        update_into: Optional[torch.Tensor]) -> torch.Tensor:
    """Where C(p_i) is decoded for ``worker_sent``: the caller's ``update_into`` (garbage until
    the server half writes there) when the algorithm lets go of C(p_i) in ``worker_sent``
    (``keeps_worker_sent`` false) and p_i is not held in that buffer; otherwise the buffer the
    exchange keeps for the bucket across rounds."""
    if (update_into is not None and not ex.algorithm.keeps_worker_sent
            and message.untyped_storage().data_ptr()
            != update_into.untyped_storage().data_ptr()):
        return update_into
    return ex.buffers.get(key, "sent", message.numel(), message.dtype, message.device)


def finish_two_phase(ex, handle: ExchangeHandle) -> torch.Tensor:
    serve_two_phase(ex, handle)
    return receive_two_phase(ex, handle)


def serve_two_phase(ex, handle: ExchangeHandle) -> None:
    """The server half: wait for the uplink, run the server steps on this rank's chunk and
    launch the downlink allgather (not waited for: :func:`receive_two_phase` does)."""
    algo, key, dtype = ex.algorithm, handle.key, handle.dtype
    bounds = handle.context["bounds"]
    start, stop = bounds[ex.rank]
    received, _ = handle.pending.pop("uplink").wait()
    # The update is decoded into the caller's update_into (the optimizer's reused bucket
    # buffer) or one fresh tensor; until the downlink arrives, two of its chunk-sized regions
    # serve the server as scratch (the mean, then the addend and C(v)), so a rank keeps no
    # server buffers.  A compensated round keeps r_i there: its server works in the
    # exchange's shared scratch instead.  Either is taken only when a step needs it.
    update = handle.context.get("update_into")
    if update is None:
        update = allocate(bounds[-1][1], dtype, received.device)
    taken = []

    def scratch():
        """(mean, other): the server's two chunk-sized scratch regions."""
        if not taken:
            taken.extend(_server_scratch(ex, handle, update, start, stop))
        return taken
    up = ex.uplink(key)
    payloads = split(received, [payload_nbytes(up, stop - start, dtype)] * ex.size, key)
    del received
    # server: v = m + e, m the N payloads of the chunk this rank owns averaged in rank order:
    # in one pass over e where the algorithm and the compressor allow
    # (Algorithm.server_adds_mean_to), else m decoded into scratch for server_message to add
    up_seed, mean = ex.seed_for(key, "up", ex.rank), None
    server_message = _mean_added_in_pass(algo, up, key, payloads, up_seed, stop - start, update)
    if server_message is None:
        mean, other = scratch()
        decode_mean_into(up, payloads, mean, other, up_seed)
        server_message = algo.server_message(key, mean)
    del payloads
    # the norm's pass over v also packs its bits (unscaled), for the compressors that can
    bucket, unscaled = server_bucket_norm(ex.comm, ex.ledger, ex.name(key, "down_norm"),
                                          algo.down, server_message, bounds[-1][1])
    seed = ex.seed_for(key, "down", ex.rank)
    # C(v) goes over the mean, which the exchange does not read again, unless v lives there
    # (v is the mean, or written into it); an algorithm that keeps v in its own state
    # (LIEC-SGD, DoubleSqueeze write v over their server error) leaves the other region alone,
    # and when its server_sent is the residual e ← v − C(v) it is written over v in the
    # compressor's pass (Algorithm.server_residual)
    v_in_scratch = mean is not None and _same_storage(server_message, mean)
    if algo.server_residual and not v_in_scratch and not _same_storage(server_message, update):
        payload = residual_into(algo.down, server_message, lambda numel: scratch()[1][:numel],
                                seed, bucket, unscaled)
    else:
        mean, other = scratch()
        sent = other if v_in_scratch else mean
        payload = own_payload(roundtrip_into(algo.down, server_message, sent, seed, bucket,
                                             unscaled),
                              server_message, *([mean] if handle.context["compensated"] else []))
        algo.server_sent(key, server_message, sent)
    ex.ledger.count("downlink", down=(ex.size - 1) * payload.numel())
    # downlink: one allgather of the server payloads; nothing writes over the payload (or the
    # update holding the scratch it may view) until receive_two_phase has waited for it
    handle.pending["downlink"] = ex.comm.allgather_async(payload, ex.name(key, "down"))
    handle.context["update"] = update


def _mean_added_in_pass(algo, up, key: str, payloads, seed: int, numel: int,
                        like: torch.Tensor) -> Optional[torch.Tensor]:
    """v = m + e written over the algorithm's e (``server_adds_mean_to``) in the decoder's pass
    (``up.decompress_mean_add_into``), bit for bit ``server_message(key, m)`` with m decoded by
    :func:`decode_mean_into`; None, touching nothing, where the algorithm declares no such
    step or the compressor cannot.  In the first round e is created as −0.0, the additive
    identity (−0.0 + m is m, +0.0 included), so that no round writes m into a buffer."""
    field = algo.server_adds_mean_to
    if field is None or not numel or not up.decodes_onto(like):
        return None
    errors = getattr(algo, field)
    error = errors.get(key)
    fresh = error is None
    if fresh:
        error = torch.full((numel,), -0.0, dtype=like.dtype, device=like.device)
    if up.decompress_mean_add_into(payloads, error, seed) is None:
        return None
    if fresh:
        errors[key] = error
    return error


def _server_scratch(ex, handle: ExchangeHandle, update: torch.Tensor, start: int, stop: int):
    """The server's (mean, other) scratch: two chunk-sized regions of the update
    (:func:`_server_regions`), or of the exchange's shared scratch in a compensated round,
    whose update holds r_i."""
    if handle.context["compensated"]:
        both = _scratch(ex, update)(2 * (stop - start))
        return both[:stop - start], both[stop - start:]
    return _server_regions(update, start, stop)


def receive_two_phase(ex, handle: ExchangeHandle) -> torch.Tensor:
    """The worker half: wait for the downlink, decode it over the server's scratch, and run
    ``worker_update``; a compensated round decodes C(v) onto r_i instead (C(v) + r_i, the
    same float addition as LIEC-SGD's worker_update)."""
    algo, key, dtype = ex.algorithm, handle.key, handle.dtype
    bounds = handle.context["bounds"]
    gathered = handle.pending.pop("downlink").wait()
    update = handle.context.pop("update")
    sizes = [payload_nbytes(algo.down, b - a, dtype) for a, b in bounds]
    payloads = split(gathered, sizes, key)
    if handle.context["compensated"]:
        # a decoder that adds in its own pass (sign on the C road) takes no scratch
        scratch = (None if algo.down.decodes_onto(update)
                   else _scratch(ex, update)(bounds[0][1] - bounds[0][0]))
        own = handle.context.pop("own_payloads")     # not None: r_i not formed yet
        for j, (p, (a, b)) in enumerate(zip(payloads, bounds)):
            if b == a:
                continue
            region = None if scratch is None else scratch[:b - a]
            if own is None:
                algo.down.decompress_add_into(p, update[a:b], region,
                                              ex.seed_for(key, "down", j))
            else:
                algo.down.decompress_sub_add_into(own[j], p, update[a:b], region,
                                                  ex.seed_for(key, "up", j),
                                                  ex.seed_for(key, "down", j))
        return update
    for j, (p, (a, b)) in enumerate(zip(payloads, bounds)):
        decode_into(algo.down, p, update[a:b], ex.seed_for(key, "down", j))
    return algo.worker_update(key, update)


def _server_regions(update: torch.Tensor, start: int, stop: int):
    """Two disjoint regions of ``stop − start`` elements: this rank's own chunk of the update
    (the mean, then C(v) when v is not kept there; the downlink decodes C(v) there again) and
    another (the decoder's addend, and C(v) when v is kept in the own chunk): the chunk before
    it (chunks before this rank's are full) or after it; when the bucket is too small for both
    (one rank, or rank 0 of two with a shorter last chunk) a fresh tensor, whose pages are only
    touched if it is written (``sign`` adds in the same pass as it decodes and never is)."""
    own = stop - start
    if own <= start:
        return update[start:stop], update[:own]
    if stop + own <= update.numel():
        return update[start:stop], update[stop:stop + own]
    return update[start:stop], allocate(own, update.dtype, update.device)


# --- allgather (GRACE/DGC) ---------------------------------------------------------------------
def start_allgather(ex, key: str, flat: torch.Tensor) -> ExchangeHandle:
    algo, up = ex.algorithm, ex.uplink(key)
    message = algo.worker_message(key, flat)
    sent = ex.buffers.get(key, "sent", flat.numel(), flat.dtype, flat.device)
    payload = own_payload(roundtrip_into(up, message, sent, ex.seed_for(key, "up", 0)), message)
    algo.worker_sent(key, message, sent)
    ex.ledger.count("uplink", up=(ex.size - 1) * payload.numel())
    pending = {"uplink": ex.comm.allgather_async(payload, ex.name(key, "up"))}
    return ExchangeHandle(key, ex.round, "allgather", flat.shape, flat.dtype, pending)


def finish_allgather(ex, handle: ExchangeHandle) -> torch.Tensor:
    key, dtype = handle.key, handle.dtype
    numel = handle.shape.numel()
    gathered = handle.pending["uplink"].wait()
    up = ex.uplink(key)
    sizes = [payload_nbytes(up, numel, dtype)] * ex.size
    # the mean is returned through the server steps: decoded into the caller's update_into
    # (else a fresh tensor); the addend is fresh (kept across rounds it would hold a whole
    # bucket for a pattern that decodes N whole payloads)
    mean = _update_buffer(handle, gathered.device)
    addend = allocate(numel, dtype, gathered.device) if ex.size > 1 else mean
    decode_mean_into(up, split(gathered, sizes, key), mean, addend, ex.seed_for(key, "up", 0))
    return replicated_server(ex, key, mean)


# --- allreduce (linear compressors) ------------------------------------------------------------
def start_allreduce(ex, key: str, flat: torch.Tensor) -> ExchangeHandle:
    algo = ex.algorithm
    message = algo.worker_message(key, flat)
    sent = ex.buffers.get(key, "sent", flat.numel(), flat.dtype, flat.device)
    payload = own_payload(roundtrip_into(algo.up, message, sent, ex.seed_for(key, "up", 0)),
                          message)
    algo.worker_sent(key, message, sent)
    wire = summable_dtype(algo.up, flat.dtype)
    values = payload.view(wire)
    ex.ledger.count_ring_allreduce("allreduce", values.numel(), wire)
    pending = {"allreduce": ex.comm.allreduce_async(values, ex.name(key, "allreduce"),
                                                    "average")}
    return ExchangeHandle(key, ex.round, "allreduce", flat.shape, flat.dtype, pending,
                          wire=wire)


def finish_allreduce(ex, handle: ExchangeHandle) -> torch.Tensor:
    averaged = handle.pending["allreduce"].wait()
    # decoded into the caller's update_into or a fresh tensor, not in the payload: the server
    # steps may add into the mean in place, and a linear compressor's decompress may return a
    # view of its payload
    mean = _update_buffer(handle, averaged.device)
    decode_into(ex.algorithm.up, averaged.view(torch.uint8), mean,
                ex.seed_for(handle.key, "up", 0))
    return replicated_server(ex, handle.key, mean)


def _update_buffer(handle: ExchangeHandle, device) -> torch.Tensor:
    """Where a replicated round decodes the mean (its update): the caller's ``update_into``
    (the algorithm steps do not read the gradient after ``start``), else a fresh tensor."""
    into = handle.context.get("update_into")
    return into if into is not None else allocate(handle.shape.numel(), handle.dtype, device)


def replicated_server(ex, key: str, mean: torch.Tensor) -> torch.Tensor:
    """Server steps run on every rank over the whole bucket; no downlink compression."""
    algo = ex.algorithm
    server_message = algo.server_message(key, mean)
    sent = server_message
    if server_message.untyped_storage().data_ptr() != mean.untyped_storage().data_ptr():
        # v lives in the algorithm's state (written over its error, which server_sent then
        # overwrites): C(v) = v goes on in the mean's buffer, which nothing reads any more
        sent = mean.copy_(server_message)
    algo.server_sent(key, server_message, sent)
    return algo.worker_update(key, sent)


# --- a method that runs its own collectives (round_kind "owned": PowerSGD) ---------------------
def owned_allreduce(ex, key: str):
    """``allreduce(tensor, phase) -> Handle`` (average over ranks) for an owned round: named
    like every collective of the bucket, counted in the ledger as a ring allreduce."""
    def allreduce(tensor: torch.Tensor, phase: str) -> Handle:
        ex.ledger.count_ring_allreduce(phase, tensor.numel(), tensor.dtype)
        return ex.comm.allreduce_async(tensor, ex.name(key, phase), "average")
    return allreduce


def start_owned(ex, key: str, flat: torch.Tensor) -> ExchangeHandle:
    if ex.pattern != "allreduce":
        raise ValueError(f"algorithm {ex.algorithm.name!r} all-reduces its own messages: use "
                         f"pattern 'allreduce', not {ex.pattern!r}")
    state = ex.algorithm.start_round(key, flat, owned_allreduce(ex, key))
    return ExchangeHandle(key, ex.round, "owned", flat.shape, flat.dtype, {}, state=state)


def finish_owned(ex, handle: ExchangeHandle) -> torch.Tensor:
    return ex.algorithm.finish_round(handle.key, handle.context["state"],
                                     owned_allreduce(ex, handle.key))


STARTS = {"two_phase": start_two_phase, "allgather": start_allgather,
          "allreduce": start_allreduce, "owned": start_owned}
FINISHES = {"two_phase": finish_two_phase, "allgather": finish_allgather,
            "allreduce": finish_allreduce, "owned": finish_owned}
#: the kinds whose finish splits into a server half (ends with the downlink launched) and a
#: worker half (waits for it, decodes, worker_update)
SPLIT_FINISHES = {"two_phase": (serve_two_phase, receive_two_phase)}
