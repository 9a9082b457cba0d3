"""Lossless and cast compressors: ``none``, ``fp16``, ``bf16``.

All three send every element, so their δ-contraction constant is 1 up to rounding:
``none`` is exact (δ = 1), the casts lose at most half an ulp of the wire format per element,
||C(x) − x||² ≤ u²·||x||² with u = 2⁻¹¹ (fp16, normal range) or 2⁻⁸ (bf16), i.e. δ = 1 − u².
fp16 subnormals (|x| < 6.1e-5) round to an absolute 2⁻²⁵ instead of a relative error.
"""
from __future__ import annotations

import torch

from ._wire import check_out_dtype, check_payload, flat_input, itemsize
from .base import Compressor, check_finite, read_field
from .registry import register


class _Cast(Compressor):
    """Send the elements in ``wire_dtype``; bytes = numel · itemsize(wire_dtype)."""
    _wire: torch.dtype = torch.float32
    linear = True
    parameters = {}  # none, fp16 and bf16 take no parameters

    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return numel * itemsize(self._wire)

    def wire_dtype(self, dtype: torch.dtype = torch.float32) -> torch.dtype:
        return self._wire

    def compress(self, x, seed=0):
        x = flat_input(x, self.name)
        wire = x.to(self._wire)
        # Check the cast, not the input: it is non-finite when x is, and also when a finite
        # value overflowed the wire format (|x| > 65504 in fp16).
        check_finite(wire, f"gradient cast to {self._wire} (which overflows beyond "
                           f"±{torch.finfo(self._wire).max:g})")
        return wire.view(torch.uint8)

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        check_out_dtype(dtype, self.name)
        check_payload(payload, self.payload_nbytes(numel, dtype), self.name, numel)
        return read_field(payload, 0, numel, self._wire).to(dtype)

    def decompress_into(self, payload, out, seed=0):
        """One conversion straight into ``out`` (no intermediate tensor)."""
        numel = out.numel()
        check_out_dtype(out.dtype, self.name)
        check_payload(payload, self.payload_nbytes(numel, out.dtype), self.name, numel)
        wire = self._wire if type(self) is not NoCompression else out.dtype
        return out.copy_(read_field(payload, 0, numel, wire).view_as(out))


@register("none")
class NoCompression(_Cast):
    """Identity: the elements themselves, in their own dtype, bit for bit.

    Bytes: numel · itemsize(dtype) (the only compressor whose size depends on the dtype).
    δ = 1 (C(x) = x).  Linear: payloads viewed as ``dtype`` sum like the tensors.
    No copies: the payload is a byte view of (contiguous) x and the decoded tensor a view of the
    payload, so writing to x afterwards changes both; copy them if x is reused in place."""

    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return numel * itemsize(dtype)

    def wire_dtype(self, dtype: torch.dtype = torch.float32) -> torch.dtype:
        return dtype

    def compress(self, x, seed=0):
        x = flat_input(x, self.name)
        check_finite(x)
        return x.view(torch.uint8)

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        check_out_dtype(dtype, self.name)
        check_payload(payload, self.payload_nbytes(numel, dtype), self.name, numel)
        return read_field(payload, 0, numel, dtype)


@register("fp16")
class FP16(_Cast):
    """IEEE half precision.  Bytes = 2·numel.  δ = 1 − 2⁻²² (round to nearest, normal range).

    Values beyond ±65504 overflow to Inf in fp16; compress refuses them (CompressionError) rather
    than sending Inf.  Linear up to rounding: an allreduce may sum payloads viewed as float16."""
    _wire = torch.float16


@register("bf16")
class BF16(_Cast):
    """bfloat16 (fp32's range, 8 bits of mantissa).  Bytes = 2·numel.  δ = 1 − 2⁻¹⁶.

    Not ``linear`` for the exchange although the cast is linear up to rounding: Horovod's torch
    binding has no bfloat16 allreduce, so bf16 payloads must travel as bytes (alltoall/allgather),
    never summed."""
    _wire = torch.bfloat16
    linear = False

    def wire_dtype(self, dtype: torch.dtype = torch.float32) -> torch.dtype:
        return Compressor.wire_dtype(self, dtype)
