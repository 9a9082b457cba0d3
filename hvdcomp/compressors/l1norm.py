"""The L1 norm of the sign compressors, defined so that a one-pass kernel can give it bit for bit.

A float reduction's last bit depends on its summation order (torch's CPU kernel, a fused C loop,
Inductor and the thread count all sum differently), so "the same L1 norm" across roads needs an
order-free definition.  On CPU, for float32 input (fp16/bf16 are widened to float32 first, which
is exact):

  every element |x_i| = m_i · 2^(max(e_i, 1) − 150), with e_i its biased exponent and m_i its
  24-bit mantissa (implicit bit included); the integer sums B_e = Σ_{e_i = e} m_i are exact and
  independent of order and threads; ‖x‖₁ = float32(Σ_e float64(B_e) · 2^(max(e, 1) − 150)), the
  last sum over the 256 bins by the same torch op on both roads.

That is within 2⁻⁴⁴ relative of the exact sum before the final rounding to float32 (one
rounding: more accurate than a float32 cascade).  An Inf or NaN element lands in bin 255, whose
weight 2^105 times a mantissa ≥ 2^23 makes the float32 norm Inf: non-finite input gives a
non-finite norm, which is what the finite check reads.  The reference computes the bins with
``torch.bincount`` (exact float64 sums of integers); the fast road (:mod:`._native`) in the same
pass as the sign bits.

float64 input and non-CPU devices keep ``torch.linalg.vector_norm`` (on CUDA a contended
integer histogram would cost more than the reduction; CPU and CUDA scales may differ in the last
bit, as any two reductions do).
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from . import _native
from ._wire import compute_dtype

_WEIGHTS: Dict[torch.device, torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    """2^(max(e, 1) − 150) for e = 0..255, float64 (exact powers of two)."""
    weights = _WEIGHTS.get(device)
    if weights is None:
        weights = torch.tensor([math.ldexp(1.0, max(e, 1) - 150) for e in range(256)],
                               dtype=torch.float64, device=device)
        _WEIGHTS[device] = weights
    return weights


def binned(x: torch.Tensor) -> bool:
    """True when ‖x‖₁ is the binned, order-free norm (CPU, not float64)."""
    return x.device.type == "cpu" and x.dtype != torch.float64


def norm_from_bins(bins: torch.Tensor) -> torch.Tensor:
    """float32 ‖x‖₁ from the 256 exponent bins (int64)."""
    return (bins.to(torch.float64) * _weights(bins.device)).sum().to(torch.float32)


#: elements per ``bincount`` call: its float64 sums of mantissas (< 2^24 each) stay below 2^53,
#: so every addition is exact whatever order bincount adds in
_EXACT_PIECE = 1 << 28


def reference_bins(x32: torch.Tensor) -> torch.Tensor:
    """The exponent bins of a float32 tensor with plain torch ops (CPU)."""
    words = x32.reshape(-1).view(torch.int32)
    bins = torch.zeros(256, dtype=torch.int64, device=x32.device)
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


def signs_and_norm(x: torch.Tensor, bits: torch.Tensor, want_norm: bool):
    """Pack the sign bits of the 1-D tensor ``x`` into ``bits`` (as :func:`.bitpack.pack_signs`)
    and return ‖x‖₁ (as :func:`l1_norm`) when ``want_norm``, else None: one pass over float32
    CPU input on the fast road."""
    from . import bitpack
    lib = _native.usable(x, bits) if x.dtype == torch.float32 else None
    if lib is None:
        norm = l1_norm(x) if want_norm else None
        bitpack.pack_signs(x, bits)
        return norm
    bins = torch.zeros(256, dtype=torch.int64) if want_norm else None
    _native.sign_encode(lib, x, bits, bins)
    return norm_from_bins(bins) if want_norm else None
