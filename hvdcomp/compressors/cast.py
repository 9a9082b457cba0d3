"""Lossless and cast compressors: ``none``, ``fp16``, ``bf16``."""
from __future__ import annotations

import torch

from .base import Compressor, check_finite
from .registry import register


class _Cast(Compressor):
    """Send the elements in ``wire_dtype``; bytes = numel · itemsize(wire_dtype)."""
    wire_dtype: torch.dtype = torch.float32
    linear = True

    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return numel * torch.empty((), dtype=self.wire_dtype).element_size()

    def compress(self, x, seed=0):
        check_finite(x)
        return x.reshape(-1).to(self.wire_dtype).contiguous().view(torch.uint8)

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        return payload.view(self.wire_dtype)[:numel].to(dtype)


@register("none")
class NoCompression(_Cast):
    """Identity: the elements themselves, in their own dtype, bit for bit.

    Bytes: numel · itemsize(dtype)."""
    def compress(self, x, seed=0):
        check_finite(x)
        return x.reshape(-1).contiguous().view(torch.uint8)

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        return payload.view(dtype)[:numel]

    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return numel * torch.empty((), dtype=dtype).element_size()


@register("fp16")
class FP16(_Cast):
    """IEEE half precision; bytes = 2·numel. Linear up to rounding."""
    wire_dtype = torch.float16


@register("bf16")
class BF16(_Cast):
    """bfloat16, sent as raw bytes (Horovod's torch binding has no bf16 collectives); 2·numel."""
    wire_dtype = torch.bfloat16
