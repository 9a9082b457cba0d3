"""Scaled sign compressors: ``sign`` (the papers' SignSGD: one scale per bucket), ``chunksign``
(one scale per chunk the exchange hands it) and ``blocksign`` (Blockwise-SignSGD: one per block).

C(x) = (‖x‖₁ / d) · sign(x)  (Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient
Compression Schemes", ICML 2019, eq. (4) with the scale of their Lemma 8); LIEC-SGD's released code
applies it to the whole model ("SignSGD", one block) or per block of parameters
("Blockwise-SignSGD", research notes §1.3).

Which vector the scale belongs to.  Under the two-phase exchange every bucket is cut into N chunks,
one per rank; a compressor that only sees its chunk would give every chunk its own scale, so the
method would change with the world size (N scales per bucket).  ``sign`` keeps the papers' meaning
whatever N is: it declares ``needs_bucket_norm``, and the exchange hands it the L1 norm and size of
the whole bucket (the worker holds the bucket; the servers add their chunks' L1 norms with one
allgather of N numbers), so every chunk is sent with the bucket's scale ‖x‖₁/d.  ``chunksign`` is
the per-chunk variant (one scale per rank's chunk: blockwise sign with N blocks), ``blocksign`` a
fixed block size independent of N.

Contraction.  With s = ‖x‖₁/d and sign(x)ᵢ ∈ {±1}:
    ‖C(x) − x‖² = ‖x‖² − 2s·⟨sign(x), x⟩ + s²·d = ‖x‖² − ‖x‖₁²/d,
so δ(x) = ‖x‖₁² / (d·‖x‖²) ∈ [1/d, 1] (exactly, up to the fp32 rounding of s).  Per block b of
d_b elements the same holds block by block: ‖C(x) − x‖² = Σ_b (‖x_b‖² − ‖x_b‖₁²/d_b), hence
δ(x) = Σ_b ‖x_b‖₁²/d_b / ‖x‖² ≥ min_b δ(x_b) ≥ 1/block.

Zeros.  An element equal to 0 (or −0.0) is sent with sign +1: the bit is ``x >= 0``.  Any choice
gives the same ⟨sign(x), x⟩ = ‖x‖₁ and so the same error; what matters for error feedback is
that the sender uses the decoded C(x) (``roundtrip``), which it does.  A zero scale (an all-zero
tensor or block) decodes to exact zeros, so the error of an all-zero input is exactly zero.

Wire format (little-endian), all fields of a payload back to back:
    sign, chunksign: [scale: fp32][bits: ceil(d/8) bytes]      -> 4 + ceil(d/8) bytes
    blocksign:       [scales: fp32 × ceil(d/block)][bits]      -> 4·ceil(d/block) + ceil(d/8)
(``sign``'s chunk payloads all carry the bucket's scale; its downlink adds the allgather of the
N chunk norms, 8 bytes each, which the exchange counts.)
Bit 7−i of byte q (MSB first, as numpy.packbits) is the sign of element 8q+i (1 = non-negative).
Empty chunks send 0 bytes.

The L1 norm is :func:`.l1norm.l1_norm`: on CPU an order-free sum (exact per-exponent integer
bins, one float32 rounding), so the one-pass C kernel and the torch reference give the same scale.

Cost: compress is an L1 norm (one read of x), one comparison (read x, write d bytes) and the bit
packing (on CPU with the C kernels, :mod:`._native`, all three in one pass); decompress unpacks
the bits and writes ±scale once per element with one table gather (blocksign adds one in-place
multiply by the block scales).  ``decompress_into`` writes into the caller's buffer, which is how
the exchange (and ``roundtrip_into``) avoid a fresh allocation per chunk.  All passes are memory
passes; without the C kernels the CPU packing goes through numpy (see :mod:`.bitpack`).
Measured in docs/benchmarks.md.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import bitpack
from ._wire import (Layout, LayoutCompressor, allocate, check_int, check_out_dtype, check_payload,
                    compute_dtype, flat_input)
from .base import check_finite
from .l1norm import l1_norm, signs_and_norm
from .registry import register

#: ``(‖bucket‖₁, numel of the bucket)``: what the exchange passes to ``sign`` for one chunk
BucketNorm = Tuple[torch.Tensor, int]


@register("chunksign")
class ChunkSign(LayoutCompressor):
    """Scaled sign over the vector it is given: C(x) = (‖x‖₁/d)·sign(x), sign(0) = +1.

    Under the two-phase exchange that vector is one rank's chunk, so a bucket travels with N
    scales (blockwise sign with N blocks, changing with the world size); under the allgather
    pattern it is the whole bucket.  ``sign`` is the same function with the bucket's scale.

    Bytes: 4 + ceil(d/8) (one fp32 scale, 1 bit per element); 0 when d = 0.
    δ(x) = ‖x‖₁²/(d‖x‖²) ≥ 1/d, with equality of the error formula (not just a bound).
    Not linear (the sum of two payloads is not a payload of the sum)."""

    parameters = {}  # chunksign and sign take no parameters

    def _layout(self, numel: int) -> Layout:
        return Layout([("scale", torch.float32, 1),
                       ("bits", torch.uint8, bitpack.packed_nbytes(numel))])

    def compress(self, x, seed=0):
        return self._encode(x, None)

    def _encode(self, x, bucket: Optional[BucketNorm], unscaled: Optional[torch.Tensor] = None):
        """The payload of ``x`` with the scale ‖·‖₁/d of ``bucket`` (``(l1, numel)``), or of
        ``x`` itself when ``bucket`` is None.  ``unscaled``: ``x``'s payload from
        :meth:`Sign.encode_unscaled`, whose bits are kept (only the scale is written)."""
        x = flat_input(x, self.name)
        numel = x.numel()
        if not numel:
            return torch.empty(0, dtype=torch.uint8, device=x.device)
        layout = self._layout(numel)
        if unscaled is None:
            payload = layout.allocate(x.device)
            # one pass on the fast road: sign bits and (without a bucket norm) the L1 bins
            l1 = signs_and_norm(x, layout.view(payload, "bits"), want_norm=bucket is None)
        else:
            payload, l1 = unscaled, None
        l1, count = (l1, numel) if bucket is None else bucket
        # the bucket's norm is non-finite whenever this chunk holds a NaN/Inf (it is a sum over it)
        check_finite(x, summary=l1)
        layout.view(payload, "scale").copy_(l1 / count)
        return payload

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        check_out_dtype(dtype, self.name)
        return self.decompress_into(payload, allocate(numel, dtype, payload.device), seed)

    def decompress_into(self, payload, out, seed=0):
        """Decode into ``out`` (one 2048-entry ±scale table gather, no intermediate)."""
        numel, dtype = out.numel(), out.dtype
        check_out_dtype(dtype, self.name)
        check_payload(payload, self.payload_nbytes(numel), self.name, numel)
        if not numel:
            return out
        layout = self._layout(numel)
        scale = layout.read(payload, "scale")[0]
        return bitpack.unpack_signs(layout.read(payload, "bits"), numel, dtype, scale, out=out)

    def decompress_add_into(self, payload, out, scratch, seed=0, scale=None):
        """``out += C(payload)`` (then ``out *= scale``): on CPU with the C kernels in one pass
        (each ±‖x‖₁/d table row added to ``out``), otherwise decoded into ``scratch``."""
        numel = out.numel()
        check_payload(payload, self.payload_nbytes(numel), self.name, numel)
        if numel:
            layout = self._layout(numel)
            l1_scale = layout.read(payload, "scale")[0]
            if bitpack.add_signs(layout.read(payload, "bits"), numel, l1_scale, out, scale):
                return out
        return super().decompress_add_into(payload, out, scratch, seed, scale)

    def decompress_sub_into(self, payload, out, scratch=None, seed=0):
        """``out −= C(payload)``: on CPU with the C kernels in one pass, adding the rows of the
        ∓‖x‖₁/d table (x − s and x + (−s) are the same IEEE operation, so the same bits as
        decoding and subtracting); otherwise decoded into ``scratch``."""
        numel = out.numel()
        check_payload(payload, self.payload_nbytes(numel), self.name, numel)
        if numel:
            layout = self._layout(numel)
            l1_scale = layout.read(payload, "scale")[0]
            if bitpack.add_signs(layout.read(payload, "bits"), numel, -l1_scale, out):
                return out
        return super().decompress_sub_into(payload, out, scratch, seed)

    def decodes_onto(self, out):
        return bitpack.decodes_onto(out)

    def decompress_mean_add_into(self, payloads, out, seed=0):
        """``out += (C(p_0) + ... + C(p_{N−1})) · (1/N)`` on CPU with the C kernels, in one pass
        reading the N bit arrays (None, touching nothing, elsewhere)."""
        numel = out.numel()
        for payload in payloads:
            check_payload(payload, self.payload_nbytes(numel), self.name, numel)
        if not numel:
            return None
        layout = self._layout(numel)
        bits = [layout.read(p, "bits") for p in payloads]
        scales = [layout.read(p, "scale")[0] for p in payloads]
        return out if bitpack.add_mean_signs(bits, scales, numel, out) else None

    def decompress_sub_add_into(self, own, payload, out, scratch, own_seed=0, seed=0):
        """``out ← (out − C(own)) + C(payload)``: the compensated update r_i + C(v) with
        r_i = x − C(x) formed here, ``out`` holding x and ``own`` its payload.  On CPU with the
        C kernels in one pass (the ∓ rows of ``own``'s table, then the ± rows of
        ``payload``'s, added in that order), otherwise as :meth:`decompress_sub_into` then
        :meth:`decompress_add_into`: the same two float additions either way."""
        numel = out.numel()
        check_payload(own, self.payload_nbytes(numel), self.name, numel)
        check_payload(payload, self.payload_nbytes(numel), self.name, numel)
        if numel:
            layout = self._layout(numel)
            if bitpack.add_two_signs(layout.read(own, "bits"), -layout.read(own, "scale")[0],
                                     layout.read(payload, "bits"),
                                     layout.read(payload, "scale")[0], numel, out):
                return out
        self.decompress_sub_into(own, out, scratch, own_seed)
        return self.decompress_add_into(payload, out, scratch, seed)


@register("sign")
class Sign(ChunkSign):
    """The papers' SignSGD: one scale per bucket, C(x) = (‖x‖₁/d)·sign(x) over the whole bucket,
    whatever the world size (LIEC-SGD's "SignSGD" is one block per bucket).

    Declared hook: ``needs_bucket_norm``.  The exchange passes ``bucket=(‖bucket‖₁, d)`` when it
    hands over one chunk of a bucket (the worker computes the norm of the bucket it holds; the
    sharded servers add their chunks' norms, :meth:`partial_norm`, with one small allgather), and
    every chunk payload then carries that scale.  Without ``bucket`` the vector given is the whole
    bucket, so ``compress`` alone is the plain whole-vector formula.

    Bytes per chunk as ``chunksign``: 4 + ceil(d/8).  δ as ``chunksign`` over the whole bucket."""

    needs_bucket_norm = True

    @staticmethod
    def partial_norm(x: torch.Tensor) -> torch.Tensor:
        """‖x‖₁ of one chunk (0-d, float64 for float64 input, float32 otherwise); the bucket's
        norm is the sum over its chunks."""
        return l1_norm(x.detach().reshape(-1))

    def encode_unscaled(self, x: torch.Tensor):
        """``(payload, partial_norm(x))`` from one pass over the chunk ``x``, the payload's
        scale not yet written: the bits do not depend on the scale.  A server passes the payload
        back as ``unscaled=`` once the bucket's norm is known, and ``x`` is read once, not twice
        (norm, then bits).  The same norm as :meth:`partial_norm` (both are
        :func:`.l1norm.l1_norm`'s value) and the same payload as :meth:`compress`."""
        x = flat_input(x, self.name)
        if not x.numel():
            return torch.empty(0, dtype=torch.uint8, device=x.device), self.partial_norm(x)
        layout = self._layout(x.numel())
        payload = layout.allocate(x.device)
        return payload, signs_and_norm(x, layout.view(payload, "bits"), want_norm=True)

    def compress(self, x, seed=0, bucket: Optional[BucketNorm] = None,
                 unscaled: Optional[torch.Tensor] = None):
        return self._encode(x, bucket, unscaled)

    def roundtrip_into(self, x, out, seed=0, bucket: Optional[BucketNorm] = None,
                       unscaled: Optional[torch.Tensor] = None):
        payload = self._encode(x, bucket, unscaled)
        self.decompress_into(payload, out, seed)
        return payload

    def roundtrip_chunks_into(self, x: torch.Tensor, bounds, out: torch.Tensor):
        """The worker's chunks of the bucket ``x`` (``bounds``: (start, stop) per chunk, every
        start a multiple of 8), each with the bucket's scale, decoded into ``out``; returns the
        payloads.  The bits do not depend on the scale, so the bucket's bits and its L1 norm
        come from one pass over ``x`` (one pass less than the norm, then the bits of each chunk)
        and each payload takes its chunk's bytes; the same payloads, bit for bit."""
        payloads = self.chunk_payloads(x, bounds)
        for (start, stop), payload in zip(bounds, payloads):
            if start != stop:
                self.decompress_into(payload, out[start:stop])
        return payloads

    def chunk_payloads(self, x: torch.Tensor, bounds, addend: Optional[torch.Tensor] = None):
        """One payload per chunk of ``x``, all with the bucket's scale: the bits and the L1 norm
        of the whole bucket from one pass, then each chunk's bytes copied out.  With ``addend``
        (``x``'s shape), ``x`` is first written as ``torch.add(addend, x, out=x)``, in that same
        pass on the C road, and the payloads are the sum's."""
        x = flat_input(x, self.name)
        numel = x.numel()
        bits = allocate(bitpack.packed_nbytes(numel), torch.uint8, x.device)
        l1 = signs_and_norm(x, bits, want_norm=True,
                            addend=None if addend is None else addend.reshape(-1))
        check_finite(x, summary=l1)
        scale = l1 / numel
        payloads = []
        for start, stop in bounds:
            if start == stop:
                payloads.append(torch.empty(0, dtype=torch.uint8, device=x.device))
                continue
            layout = self._layout(stop - start)
            payload = layout.allocate(x.device)
            layout.view(payload, "scale").copy_(scale)
            chunk_bits = layout.view(payload, "bits")
            chunk_bits.copy_(bits[start // 8:start // 8 + chunk_bits.numel()])
            payloads.append(payload)
        return payloads


@register("blocksign")
class BlockSign(LayoutCompressor):
    """Scaled sign per block of ``block`` elements (Blockwise-SignSGD, LIEC-SGD §1.3): block b
    gets its own scale ‖x_b‖₁/d_b; the last block may be shorter (d_b = d mod block).

    Bytes: 4·ceil(d/block) + ceil(d/8); 0 when d = 0.
    δ(x) = Σ_b ‖x_b‖₁²/d_b / ‖x‖² ≥ 1/block (exact error formula as for ``sign``).
    ``block`` in [1, 2^31).  With the exchange's 64-element chunk alignment, a block that divides
    64 (or a multiple of 64) never straddles two ranks' chunks."""

    parameters = {"block": "an integer in [1, 2^31 - 1]"}

    def __init__(self, block: int = 1024):
        self.block = check_int("blocksign", "block", block, 1, (1 << 31) - 1)

    def _layout(self, numel: int) -> Layout:
        return Layout([("scales", torch.float32, -(-numel // self.block)),
                       ("bits", torch.uint8, bitpack.packed_nbytes(numel))])


    def compress(self, x, seed=0):
        x = flat_input(x, self.name)
        numel = x.numel()
        if not numel:
            return torch.empty(0, dtype=torch.uint8, device=x.device)
        layout = self._layout(numel)
        payload = layout.allocate(x.device)
        scales = layout.view(payload, "scales")
        full_blocks, tail = divmod(numel, self.block)
        acc = compute_dtype(x.dtype)
        if full_blocks:
            body = x[:full_blocks * self.block].view(full_blocks, self.block)
            l1 = torch.linalg.vector_norm(body, 1, dim=1, dtype=acc)
            scales[:full_blocks].copy_(l1 / self.block)
        if tail:
            l1_tail = torch.linalg.vector_norm(x[full_blocks * self.block:], 1, dtype=acc)
            scales[full_blocks].copy_(l1_tail / tail)
        # The fp32 scales are non-finite whenever a block holds NaN/Inf: check them, not x.
        check_finite(x, summary=scales)
        bitpack.pack_signs(x, layout.view(payload, "bits"))
        return payload

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        check_out_dtype(dtype, self.name)
        return self.decompress_into(payload, allocate(numel, dtype, payload.device), seed)

    def decompress_into(self, payload, out, seed=0):
        """Decode into ``out``: ±1 from the bits, then one in-place multiply by the block
        scales."""
        numel, dtype = out.numel(), out.dtype
        check_out_dtype(dtype, self.name)
        check_payload(payload, self.payload_nbytes(numel), self.name, numel)
        if not numel:
            return out
        layout = self._layout(numel)
        scales = layout.read(payload, "scales").to(dtype)
        if out.dim() != 1 or not out.is_contiguous():   # the block views need contiguous rows
            return out.copy_(self.decompress(payload, numel, dtype, seed).view_as(out))
        bitpack.unpack_signs(layout.read(payload, "bits"), numel, dtype, out=out)
        full_blocks, tail = divmod(numel, self.block)
        if full_blocks:
            out[:full_blocks * self.block].view(full_blocks, self.block).mul_(
                scales[:full_blocks].unsqueeze(1))
        if tail:
            out[full_blocks * self.block:].mul_(scales[full_blocks])
        return out
