"""What the exchange asks of compressors: chunking, payload checks, decoding into buffers.

Chunking (:func:`chunk_bounds`): a bucket of d elements is cut into N chunks of ``ceil(d/N)``
elements rounded up to a multiple of ``alignment``; the last chunks may be shorter or empty (an
empty chunk sends 0 bytes, its compressor is never called).  ``alignment`` defaults to
lcm(64, each compressor's declared ``Compressor.alignment``), so that bit-packed chunks are whole
bytes and blocks never straddle chunks: a blockwise compressor then gives the same result sharded
as on the whole bucket.

A compressor that declares ``needs_bucket_norm`` (``sign``: one scale per bucket, as the papers'
SignSGD) is handed ``bucket=(‖bucket‖₁, numel)`` with each chunk, so that sharding the bucket over
N ranks does not change its output: the worker holds the whole bucket; the servers each hold one
chunk and add their chunks' ``partial_norm`` with one allgather of N numbers (summed in rank
order: the same total on every rank).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .comm.base import Communicator, scale_like_horovod
from .compressors import Compressor
from .exchange_ledger import ByteLedger

#: smallest chunk alignment in elements: 64 keeps 1-bit payloads whole bytes (and 2-, 4-bit ones)
BASE_ALIGNMENT = 64


def chunk_bounds(numel: int, size: int, alignment: int = BASE_ALIGNMENT) -> List[Tuple[int, int]]:
    """``[(start, stop)]`` of the chunk each of ``size`` ranks owns in a bucket of ``numel``."""
    if size < 1 or alignment < 1 or numel < 0:
        raise ValueError(f"chunk_bounds needs numel ≥ 0, size ≥ 1, alignment ≥ 1; got "
                         f"{numel}, {size}, {alignment}")
    per_rank = math.ceil(numel / size)
    per_rank = math.ceil(per_rank / alignment) * alignment
    return [(min(j * per_rank, numel), min((j + 1) * per_rank, numel)) for j in range(size)]


def default_alignment(*compressors: Compressor) -> int:
    """lcm of :data:`BASE_ALIGNMENT` and each compressor's declared ``alignment``."""
    alignment = BASE_ALIGNMENT
    for compressor in compressors:
        alignment = math.lcm(alignment, int(compressor.alignment))
    return alignment


def summable_dtype(compressor: Compressor, dtype: torch.dtype) -> torch.dtype:
    """The dtype to view a linear compressor's payload as, so that an allreduce sums payloads
    (``compressor.wire_dtype(dtype)``); a clear ValueError for compressors that are not linear."""
    if not compressor.linear:
        raise ValueError(f"pattern 'allreduce' needs a linear compressor (payloads that can be "
                         f"summed); {compressor.spec()!r} is not: use pattern 'two_phase' or "
                         "'allgather'")
    try:
        return compressor.wire_dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"pattern 'allreduce': {exc}; use pattern 'two_phase'") from None


def payload_nbytes(compressor: Compressor, numel: int, dtype: torch.dtype) -> int:
    return compressor.payload_nbytes(numel, dtype) if numel else 0


def _check_payload(compressor: Compressor, x: torch.Tensor, payload: torch.Tensor) -> None:
    expected = compressor.payload_nbytes(x.numel(), x.dtype)
    if payload.dtype != torch.uint8 or payload.numel() != expected:
        raise ValueError(f"compressor {compressor.spec()!r} returned {payload.numel()} "
                         f"{payload.dtype} bytes for {x.numel()} elements; payload_nbytes "
                         f"says {expected} uint8")


def roundtrip(compressor: Compressor, x: torch.Tensor, seed: int):
    """(payload, C(x)); an empty chunk sends nothing and never reaches the compressor."""
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device), x.clone()
    payload, decoded = compressor.roundtrip(x.contiguous(), seed)
    _check_payload(compressor, x, payload)
    return payload, decoded


def roundtrip_into(compressor: Compressor, x: torch.Tensor, out: torch.Tensor, seed: int,
                   bucket=None, unscaled=None) -> torch.Tensor:
    """:func:`roundtrip` with C(x) written into ``out``; returns the payload.  ``bucket``: the
    bucket's norm for a compressor that ``needs_bucket_norm`` (``sign``); ``unscaled``: x's
    payload without its scale (:func:`server_bucket_norm`)."""
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device)
    payload = compressor.roundtrip_into(x.contiguous(), out, seed, **_norm_args(bucket, unscaled))
    _check_payload(compressor, x, payload)
    return payload


def roundtrip_chunks_into(compressor: Compressor, x: torch.Tensor,
                          bounds: Sequence[Tuple[int, int]], out: torch.Tensor,
                          seeds: Sequence[int]) -> List[torch.Tensor]:
    """The worker's uplink: each chunk ``x[a:b]`` through :func:`roundtrip_into` (C(x) into
    ``out[a:b]``, the bucket's norm for ``needs_bucket_norm``), or, for a compressor that
    encodes a bucket's chunks at once (``roundtrip_chunks_into``: ``sign``, one pass for its
    norm and bits), through that; the payloads, one per chunk."""
    chunks = getattr(compressor, "roundtrip_chunks_into", None)
    if chunks is None or x.numel() == 0:
        bucket = worker_bucket_norm(compressor, x)
        return [roundtrip_into(compressor, x[a:b], out[a:b], seed, bucket)
                for (a, b), seed in zip(bounds, seeds)]
    payloads = chunks(x, bounds, out)
    for (a, b), payload in zip(bounds, payloads):
        _check_payload(compressor, x[a:b], payload)
    return payloads


def own_payload(payload: torch.Tensor, *buffers: torch.Tensor) -> torch.Tensor:
    """``payload``, copied when it views one of ``buffers`` (``none``'s payload is its input):
    the steps write over the message, and a residual over its input, while the collective
    still reads the payload."""
    if payload.numel():
        at = payload.untyped_storage().data_ptr()
        if any(at == b.untyped_storage().data_ptr() for b in buffers):
            return payload.clone()
    return payload


def subtracts_in_pass(compressor: Compressor) -> bool:
    """Whether ``compressor`` writes x − C(x) in its decoder's pass (its own
    ``decompress_sub_into``, ``sign``): a residual then costs no buffer for C(x)."""
    return type(compressor).decompress_sub_into is not Compressor.decompress_sub_into


def _norm_args(bucket, unscaled) -> dict:
    """The keyword arguments a ``needs_bucket_norm`` compressor takes, those that are given."""
    given = {"bucket": bucket, "unscaled": unscaled}
    return {name: value for name, value in given.items() if value is not None}


def residual_into(compressor: Compressor, x: torch.Tensor, scratch: Callable[[int], torch.Tensor],
                  seed: int, bucket=None, unscaled=None) -> torch.Tensor:
    """Error feedback's residual in place, ``x ← x − C(x)``; returns the payload of ``x`` (never
    a view of ``x`` or of the scratch).  The same bits as :func:`roundtrip_into` into a buffer
    followed by ``torch.sub(x, C(x))``: a compressor that :func:`subtracts_in_pass` encodes
    and subtracts; the others decode into ``scratch(x.numel())`` and subtract."""
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device)
    if not subtracts_in_pass(compressor):
        out = scratch(x.numel())
        payload = own_payload(roundtrip_into(compressor, x, out, seed, bucket, unscaled), x, out)
        x.sub_(out)
        return payload
    payload = own_payload(compressor.compress(x, seed, **_norm_args(bucket, unscaled)), x)
    _check_payload(compressor, x, payload)
    compressor.decompress_sub_into(payload, x, None, seed)
    return payload


def residual_chunks(compressor: Compressor, x: torch.Tensor, bounds: Sequence[Tuple[int, int]],
                    scratch: Callable[[int], torch.Tensor], seeds: Sequence[int],
                    addend: Optional[torch.Tensor] = None
                    ) -> Tuple[List[torch.Tensor], Callable[[], None]]:
    """The worker's uplink with its residual in place: each chunk's payload, as
    :func:`roundtrip_chunks_into` gives them, and ``subtract()``, after which ``x ← x − C(x)``
    holds over the whole bucket (``scratch`` as for :func:`residual_into`).  A compressor that
    encodes the whole bucket in one pass (``chunk_payloads``, ``sign``) leaves the subtraction
    to ``subtract``, so that the uplink may be launched first and the pass run while it
    travels; for the others it is done on return.  With ``addend``, ``x`` is first
    ``torch.add(addend, x, out=x)`` (p = g + e), in ``sign``'s encoder pass."""
    if hasattr(compressor, "chunk_payloads") and x.numel():
        payloads = compressor.chunk_payloads(x, bounds, addend)
        for (a, b), payload in zip(bounds, payloads):
            _check_payload(compressor, x[a:b], payload)

        def subtract() -> None:       # the payloads are copies: x is the compressor's alone
            for (a, b), payload in zip(bounds, payloads):
                if a != b:
                    compressor.decompress_sub_into(payload, x[a:b])
        return payloads, subtract
    if addend is not None:
        torch.add(addend, x, out=x)
    bucket = worker_bucket_norm(compressor, x)       # of the whole bucket, before it changes
    return ([residual_into(compressor, x[a:b], scratch, seed, bucket)
             for (a, b), seed in zip(bounds, seeds)], lambda: None)


def deferred_residual_chunks(up: Compressor, down: Compressor, x: torch.Tensor,
                             bounds: Sequence[Tuple[int, int]]):
    """For a compensated r_i = x − C(x): the worker's chunk payloads, ``x`` left as it is, when
    the subtraction can wait for the downlink and share C(v)'s pass
    (``down.decompress_sub_add_into``: ``up`` and ``down`` of one kind, ``sign``, as LIEC-SGD's
    sign/sign; CSER's dense downlink does not qualify); else None."""
    if (type(up) is not type(down) or not x.numel()
            or not hasattr(up, "chunk_payloads")
            or not hasattr(down, "decompress_sub_add_into")):
        return None
    payloads = up.chunk_payloads(x, bounds)
    for (a, b), payload in zip(bounds, payloads):
        _check_payload(up, x[a:b], payload)
    return payloads


def decode_into(compressor: Compressor, payload: torch.Tensor, out: torch.Tensor,
                seed: int) -> torch.Tensor:
    if out.numel():
        compressor.decompress_into(payload, out, seed)
    return out


def decode_mean_into(compressor: Compressor, payloads: Sequence[torch.Tensor],
                     mean: torch.Tensor, addend: torch.Tensor, seed: int) -> torch.Tensor:
    """``mean`` ← (C_0 + C_1 + ... + C_{N−1}) · (1/N) of the decoded payloads: summed left to
    right so that every rank, the simulator and the oracle add in the same order, and scaled as
    Horovod's ``Average`` scales (times 1/N in the tensor's dtype, not divided by N), so that
    with the identity compressor the average equals ``hvd.allreduce(op=Average)`` whenever the
    sum itself is exact.  The first payload is decoded into ``mean``, the others added in one
    after the other by ``decompress_add_into`` (which may decode into ``addend``, a buffer as
    large as ``mean`` not overlapping it, or add in the same pass as it decodes: ``sign``)."""
    if not mean.numel():
        return mean
    decode_into(compressor, payloads[0], mean, seed)
    if len(payloads) == 1:
        return scale_like_horovod(mean, 1.0)
    for payload in payloads[1:-1]:
        compressor.decompress_add_into(payload, mean, addend, seed)
    # the last one is added and the sum scaled by 1/N in one call (one pass for sign)
    return compressor.decompress_add_into(payloads[-1], mean, addend, seed,
                                          scale=1.0 / len(payloads))


def split(buffer: torch.Tensor, sizes: Sequence[int], key: str) -> Tuple[torch.Tensor, ...]:
    if sum(sizes) != buffer.numel():
        raise ValueError(f"bucket {key!r}: received {buffer.numel()} payload bytes, expected "
                         f"{sum(sizes)}; ranks disagree on the compressor or the bucket size")
    return torch.split(buffer, list(sizes))


def worker_bucket_norm(compressor: Compressor, message: torch.Tensor):
    """``bucket=`` for the worker's chunks (it holds the whole bucket); None when not needed."""
    if not compressor.needs_bucket_norm:
        return None
    return compressor.partial_norm(message), message.numel()


def server_bucket_norm(comm: Communicator, ledger: ByteLedger, name: str,
                       compressor: Compressor, chunk: torch.Tensor, numel: int):
    """``(bucket, unscaled)`` for a server's chunk.  ``bucket=``: its norm added to the other
    servers' (one allgather of N float64 numbers, counted as downlink); None when not needed.
    ``unscaled=``: for a compressor that encodes before it knows the scale
    (``encode_unscaled``: ``sign``), the chunk's payload from the pass that took its norm,
    to hand back to ``compress``; otherwise None."""
    if not compressor.needs_bucket_norm:
        return None, None
    encode = getattr(compressor, "encode_unscaled", None)
    if encode is None:
        unscaled, mine = None, compressor.partial_norm(chunk)
    else:
        unscaled, mine = encode(chunk)
    norms = comm.allgather(mine.to(torch.float64).reshape(1), name)
    ledger.count_allgather("downlink_norm", 1, torch.float64)
    total = norms[0].clone()
    for norm in norms[1:]:
        total += norm
    return (total, numel), unscaled
