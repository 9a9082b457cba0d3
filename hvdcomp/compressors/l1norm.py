"""The L1 norm of the sign compressors, defined so that a one-pass kernel can give it bit for bit.

A float reduction's last bit depends on its summation order (torch's CPU kernel, a fused C loop,
Inductor and the thread count all sum differently), so "the same L1 norm" across roads needs an
order-free definition.  On CPU, for float32 input (fp16/bf16 are widened to float32 first, which
is exact):

  ‖x‖₁ = the exact sum Σ|x_i| rounded once to float32 (to nearest, ties to even).

Both roads compute the exact sum as integers: every |x_i| = m_i · 2^(max(e_i, 1) − 150) with
e_i its biased exponent and m_i its 24-bit mantissa (implicit bit included), and bins
B_e = Σ_{e_i = e} m_i are exact integer sums (any order, any thread count); the reference fills
them with ``torch.bincount`` (float64 sums of integers below 2^53, exact), the C kernel in the same
pass as the sign bits (blocks of 64 elements whose exponents span ≤ 23 are summed exactly in
float64 and added as two integers).  :func:`norm_from_bins` then rounds the exact total with
Python integers.  That is more accurate than a float32 reduction (torch's CPU
``vector_norm(x, 1)`` was 0.5 % off for 16 Mi Gaussian elements).  An Inf or NaN element lands in
bin 255, whose weight 2^105 times a mantissa ≥ 2^23 exceeds float32's range: non-finite input
gives an Inf norm, which is what the finite check reads.

float64 input and non-CPU devices keep ``torch.linalg.vector_norm`` (on CUDA a contended
integer histogram would cost more than the reduction; CPU and CUDA scales may differ in the last
bit, as any two reductions do).
"""
from __future__ import annotations

import math

import torch

from . import _native
from ._wire import compute_dtype


def binned(x: torch.Tensor) -> bool:
    """True when ‖x‖₁ is the binned, order-free norm (CPU, not float64)."""
    return x.device.type == "cpu" and x.dtype != torch.float64


def norm_from_bins(bins: torch.Tensor) -> torch.Tensor:
    """float32 ‖x‖₁ from the 256 exponent bins (int64, CPU): their exact total Σ B_e·2^(max(e,1)
    − 150) rounded once to float32 (to nearest, ties to even; beyond float32's range: Inf).
    Any bins with the same exact total give the same norm."""
    units = 0                                          # of 2^-149, the float32 subnormal step
    for exponent, count in enumerate(bins.tolist()):
        if count:
            units += count << (max(exponent, 1) - 1)
    return torch.tensor(_round_to_float32(units), dtype=torch.float32)


def _round_to_float32(units: int) -> float:
    """units · 2^-149 rounded to the nearest float32 (ties to even), as a Python float that
    converts to float32 exactly."""
    extra = units.bit_length() - 24                    # bits beyond float32's 24-bit significand
    if extra <= 0:                                     # exact (subnormal or short normal)
        return math.ldexp(units, -149)
    kept, rest = units >> extra, units & ((1 << extra) - 1)
    half = 1 << (extra - 1)
    if rest > half or (rest == half and kept & 1):
        kept += 1
    value = math.ldexp(kept, extra - 149)
    return value if value <= _FLOAT32_MAX else math.inf


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


#: elements per ``bincount`` call: its float64 sums of mantissas (< 2^24 each) stay below 2^53,
#: so every addition is exact whatever order bincount adds in (block sums: 2^22 blocks of 2^27)
_EXACT_PIECE = 1 << 28


def reference_bins(x32: torch.Tensor) -> torch.Tensor:
    """The exponent bins of a float32 tensor with plain torch ops (CPU), formed as the C kernel
    forms them: blocks of 64 elements whose non-zero exponents span at most 23 are summed
    exactly in float64 (any order) and added as two integers; other blocks and the tail per
    element.  Any exact binning gives the same norm; this one is the fastest in torch."""
    words = x32.reshape(-1).view(torch.int32)
    whole = words.numel() // 64 * 64
    bins = _element_bins(words[whole:])
    for start in range(0, whole, _EXACT_PIECE):
        blocks = (words[start:min(whole, start + _EXACT_PIECE)] & 0x7FFFFFFF).view(-1, 64)
        exponents = blocks >> 23
        high = exponents.amax(1)
        low = torch.where(blocks > 0, exponents.clamp(min=1), 255).amin(1)
        exact = (high < 255) & (high - low <= 23) & (low <= 229)
        sums = blocks[exact].view(torch.float32).to(torch.float64).sum(1)
        shift = (150 - low[exact]).to(torch.float64)
        units = torch.ldexp(sums, shift).to(torch.int64)          # integers below 2^53
        first = low[exact].to(torch.int64)
        bins += _bincount(first, units & ((1 << 26) - 1)) + _bincount(first + 26, units >> 26)
        bins += _element_bins(blocks[~exact & (low < 255)].reshape(-1))
    return bins


def _bincount(index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Integer sums of ``values`` (each below 2^27, at most 2^22 of them: float64 exact) per
    bin."""
    sums = torch.bincount(index, weights=values.to(torch.float64), minlength=256)
    return sums.to(torch.int64)


def _element_bins(words: torch.Tensor) -> torch.Tensor:
    """Per-element bins of float32 bit patterns (int32)."""
    bins = torch.zeros(256, dtype=torch.int64)
    for start in range(0, words.numel(), _EXACT_PIECE):
        piece = words[start:start + _EXACT_PIECE]
        exponents = (piece >> 23) & 0xFF
        mantissas = (piece & 0x7FFFFF) | ((exponents != 0).to(torch.int32) << 23)
        sums = torch.bincount(exponents, weights=mantissas.to(torch.float64), minlength=256)
        bins += sums.to(torch.int64)
    return bins


def l1_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖₁ of a 1-D tensor as a 0-d tensor (float64 for float64 input, float32 otherwise)."""
    if not binned(x):
        return torch.linalg.vector_norm(x, 1, dtype=compute_dtype(x.dtype))
    x32 = x.reshape(-1).to(torch.float32).contiguous()
    lib = _native.usable(x32)
    if lib is None:
        return norm_from_bins(reference_bins(x32))
    return norm_from_bins(_native.l1_bins(lib, x32))


def signs_and_norm(x: torch.Tensor, bits: torch.Tensor, want_norm: bool,
                   addend: "torch.Tensor | None" = None):
    """Pack the sign bits of the 1-D tensor ``x`` into ``bits`` (as :func:`.bitpack.pack_signs`)
    and return ‖x‖₁ (as :func:`l1_norm`) when ``want_norm``, else None: one pass over float32
    CPU input on the fast road.  With ``addend`` (``x``'s size and dtype), ``x`` is first
    written as ``torch.add(addend, x, out=x)``, in the same pass on the fast road, and the sum
    is what is encoded."""
    from . import bitpack
    tensors = (x, bits) if addend is None else (x, bits, addend)
    fp32 = all(t.dtype == torch.float32 for t in tensors if t is not bits)
    lib = _native.usable(*tensors) if fp32 else None
    if lib is None:
        if addend is not None:
            torch.add(addend, x, out=x)
        norm = l1_norm(x) if want_norm else None
        bitpack.pack_signs(x, bits)
        return norm
    bins = torch.zeros(256, dtype=torch.int64) if want_norm else None
    _native.sign_encode(lib, x, bits, bins, addend)
    return norm_from_bins(bins) if want_norm else None
