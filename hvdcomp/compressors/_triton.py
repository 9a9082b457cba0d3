"""The GPU road of sign packing and decoding: two Triton kernels, one memory pass each.

On CUDA the reference roads of :mod:`.bitpack` take several passes (compare, a bool buffer, the
int64 multiply, a strided copy to pack; an int32 copy of the bytes and a 2048-entry table gather
to decode; the gather ran at 49 GB/s on an H200 against 1.3 TB/s for the device-to-device copy,
docs/benchmarks.md). These kernels read each input once and write each output once:

* :func:`sign_pack`: byte q = Σ_i [x[8q+i] ≥ 0]·2^(7−i), padding bits 0 (``numpy.packbits``'s
  MSB-first order, the wire format of :mod:`.bitpack`); NaN compares false, as ``torch.ge``.
* :func:`sign_decode`: out[e] = +s if bit 7 − e mod 8 of byte e // 8 is set, else −s, with
  s = round_dtype(scale) worked in float32 (float64 for float64 outputs) — exactly the entries of
  bitpack's ±scale table, so both roads give the same values bit for bit.

Selection, by the environment variable ``HVDCOMP_TRITON``: unset/``auto`` uses the kernels on
CUDA tensors when Triton imports; ``0``/``off`` never; ``1``/``on`` requires them (raises
CompressionError when Triton is missing). Nothing launches synchronously: no host sync.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import CompressionError, road_setting

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError as missing:  # pragma: no cover - depends on the install
    triton = None
    _MISSING = str(missing)
else:
    _MISSING = ""

#: elements per program (decode) and bytes per program (pack): power-of-two tiles
_DECODE_BLOCK = 4096
_PACK_BLOCK = 512
#: element offsets are int32 inside the kernels
_MAX_NUMEL = 2 ** 31 - 8 * _DECODE_BLOCK


def setting() -> str:
    """``auto``, ``off`` or ``on`` from ``HVDCOMP_TRITON``; anything else is an error."""
    return road_setting("HVDCOMP_TRITON")


def usable(*tensors: torch.Tensor) -> bool:
    """True when the Triton road should run for these tensors: all on a CUDA device, contiguous,
    small enough for int32 offsets, and Triton selected and importable. (Tests run the kernels
    on CPU tensors under ``TRITON_INTERPRET=1`` by calling them directly.)"""
    mode = setting()
    if mode == "off":
        return False
    if triton is None:
        if mode == "on":
            raise CompressionError(f"HVDCOMP_TRITON=1 but Triton does not import: {_MISSING}")
        return False
    return all(t.is_cuda and t.is_contiguous() and t.numel() < _MAX_NUMEL for t in tensors)


if triton is not None:
    @triton.jit
    def _pack_kernel(x_ptr, out_ptr, numel, nbytes, BLOCK: tl.constexpr):
        byte = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        column = tl.arange(0, 8)
        element = byte[:, None] * 8 + column[None, :]
        x = tl.load(x_ptr + element, mask=element < numel, other=float("nan"))
        bits = (x >= 0).to(tl.int32) << (7 - column[None, :])
        tl.store(out_ptr + byte, tl.sum(bits, axis=1).to(tl.uint8), mask=byte < nbytes)

    @triton.jit
    def _decode_kernel(packed_ptr, scale_ptr, out_ptr, numel, HAS_SCALE: tl.constexpr,
                       WIDE: tl.constexpr, BLOCK: tl.constexpr):
        element = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = element < numel
        byte = tl.load(packed_ptr + element // 8, mask=inside, other=0).to(tl.int32)
        set_bit = ((byte >> (7 - element % 8)) & 1) != 0
        work = tl.float64 if WIDE else tl.float32
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(work)
        else:
            scale = tl.full((), 1.0, work)
        value = tl.where(set_bit, scale, -scale)
        tl.store(out_ptr + element, value.to(out_ptr.dtype.element_ty), mask=inside)


def sign_pack(x: torch.Tensor, out: torch.Tensor) -> None:
    """``out[q]`` = the bits ``x[8q:8q+8] >= 0``, MSB first (``out`` holds ceil(d/8) bytes)."""
    nbytes = out.numel()
    if nbytes:
        grid = (triton.cdiv(nbytes, _PACK_BLOCK),)
        _pack_kernel[grid](x, out, x.numel(), nbytes, BLOCK=_PACK_BLOCK)


def sign_decode(packed: torch.Tensor, numel: int, scale: Optional[torch.Tensor],
                out: torch.Tensor) -> None:
    """Write ±scale (±1 without a scale) for each of ``numel`` packed bits into ``out``."""
    if numel:
        grid = (triton.cdiv(numel, _DECODE_BLOCK),)
        _decode_kernel[grid](packed, packed if scale is None else scale, out, numel,
                             HAS_SCALE=scale is not None, WIDE=out.dtype == torch.float64,
                             BLOCK=_DECODE_BLOCK)
