"""Stochastic quantization: ``qsgd`` (Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017).

Q_s(x)_i = ‖x‖₂ · sign(x_i) · ξ_i / s, with ξ_i = ⌊s|x_i|/‖x‖₂⌋ + Bernoulli(frac(s|x_i|/‖x‖₂)),
so E[Q_s(x)] = x and (their Lemma 3.1) E‖Q_s(x) − x‖² ≤ ω‖x‖² with ω = min(d/s², √d/s).
Every element is off by less than one level: |Q_s(x)_i − x_i| < ‖x‖₂/s, so deterministically
‖Q_s(x) − x‖² < d·‖x‖²/s².

QSGD is unbiased, not contractive: for ω ≥ 1 its error can exceed ‖x‖².  Error-feedback
methods that assume a δ-contraction (EF21, EF-SGD) should use ``rescale=True``, which decodes
Q_s(x)/(1 + ω): then E‖C(x) − x‖² ≤ (1 − δ)‖x‖² with δ = 1/(1 + ω) (standard; e.g. Richtárik et
al., EF21, NeurIPS 2021, §2 "from unbiased to contractive").  Without rescaling, δ = 1 − ω when
ω < 1 (in expectation) and there is no contraction otherwise.
"""
from __future__ import annotations

import math

import torch

from . import _native, bitpack
from ._wire import (Layout, LayoutCompressor, check_bool, check_int, check_out_dtype, check_payload,
                    compute_dtype, flat_input, mix_seeds)
from .base import check_finite
from .registry import register

_LOW32 = 0xFFFFFFFF


def _lowbias32(words: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (C. Wellons' "lowbias32", a bijection of [0, 2^32)) on int64
    tensors holding values in [0, 2^32); products wrap modulo 2^64, their low 32 bits are
    exact."""
    words = words ^ (words >> 16)
    words = (words * 0x7FEB352D) & _LOW32
    words = words ^ (words >> 15)
    words = (words * 0x846CA68B) & _LOW32
    return words ^ (words >> 16)


def seed_words(seed: int) -> "tuple[int, int]":
    """The two 32-bit keys of :func:`counter_uniforms` for a compress ``seed``."""
    key = mix_seeds(seed)
    return key & _LOW32, (key >> 32) & _LOW32


def counter_uniforms(numel: int, seed: int, device, dtype: torch.dtype) -> torch.Tensor:
    """Uniforms in [0, 1) on a 2^-24 grid, one per element: u_i = (h(h(i ^ k1) ^ k2) >> 8)·2^-24
    with h = lowbias32 and (k1, k2) = :func:`seed_words` (seed).  Counter-based: element i's draw
    depends on (seed, i) only, so any device, any piece of the chunk and the C kernel give the
    same draws, and no generator state is stepped through the chunk (torch.rand cost ~19
    copies of the buffer on CPU)."""
    k1, k2 = seed_words(seed)
    index = torch.arange(numel, dtype=torch.int64, device=device)
    hashed = _lowbias32(_lowbias32(index ^ k1) ^ k2)
    return (hashed >> 8).to(dtype) * 2.0 ** -24


@register("qsgd")
class QSGD(LayoutCompressor):
    """QSGD with ``levels`` = s quantization levels per sign (s in [1, 127]).

    Each element is coded as c = s + sign·ξ ∈ [0, 2s] in b = ceil(log2(2s+1)) bits, packed
    LSB-first (s=1: 2 bits, s=2,3: 3 bits, s=4..7: 4 bits, ..., s=64..127: 8 bits).
    Bytes: 4 + ceil(d·b/8) (the fp32 norm, then the codes); 0 when d = 0.
    δ: see the module docstring (ω = min(d/s², √d/s); δ = 1/(1+ω) with ``rescale``).

    The Bernoulli draws are :func:`counter_uniforms` of ``seed`` (a hash of the element's
    index), so a payload is reproducible from (x, seed), on any device.  The exchange passes one
    seed to all ranks for a chunk and step, so workers draw the same uniforms; mix the rank into
    ``seed`` where independent noise across workers matters.  The norm is rounded to fp32 before
    quantizing, so the decoded values are unbiased for the norm that travels.

    Cost: a norm, then the rounding and packing: on CPU with the C kernels (:mod:`._native`,
    float32) one pass for the codes and one for the decode, the same bytes as the torch
    reference, whose element-wise passes and int64 intermediates cost several copies each.
    Not linear."""

    def __init__(self, levels: int = 4, rescale: bool = False):
        self.levels = check_int("qsgd", "levels", levels, 1, 127)
        self.rescale = check_bool("qsgd", "rescale", rescale)

    parameters = {"levels": "an integer in [1, 127]", "rescale": "true or false"}

    def contraction_problem(self) -> "str | None":
        if self.rescale:
            return None
        s = self.levels
        return (f"{self.spec()} is unbiased but no contraction: its error can reach ω‖x‖² with "
                f"ω = min(d/s², √d/s) ≥ 1 for every chunk of d ≥ s² = {s * s} elements, and error "
                "feedback amplifies such an error until the run diverges (NaN); use "
                f"qsgd:levels={s},rescale=true (decodes Q(x)/(1 + ω), a contraction), or "
                "algorithm psgd (no error feedback)")

    @property
    def bits(self) -> int:
        return (2 * self.levels).bit_length()

    def omega(self, numel: int) -> float:
        """QSGD's variance factor ω = min(d/s², √d/s) for a chunk of d elements."""
        s = self.levels
        return min(numel / s ** 2, math.sqrt(numel) / s)

    def _layout(self, numel: int) -> Layout:
        return Layout([("norm", torch.float32, 1),
                       ("codes", torch.uint8, bitpack.packed_nbytes(numel, self.bits))])


    def compress(self, x, seed=0):
        x = flat_input(x, self.name)
        numel = x.numel()
        if not numel:
            return torch.empty(0, dtype=torch.uint8, device=x.device)
        acc = compute_dtype(x.dtype)
        layout = self._layout(numel)
        payload = layout.allocate(x.device)
        norm = layout.view(payload, "norm")
        norm.copy_(torch.linalg.vector_norm(x, 2, dtype=acc))
        check_finite(x, summary=norm)
        s = self.levels
        safe_norm = torch.where(norm > 0, norm, 1.0).to(acc)
        lib = _native.usable(x) if x.dtype == torch.float32 else None
        if lib is not None and bool(torch.isfinite(norm)):   # CPU: no device to wait for
            self._encode_native(lib, x, float(safe_norm), seed, layout.view(payload, "codes"))
            return payload
        scaled = x.to(acc, copy=True).abs_().div_(safe_norm).mul_(s)  # in [0, s]; never touch x
        uniforms = counter_uniforms(numel, seed, x.device, acc)
        level = scaled.floor()
        level += uniforms < (scaled - level)                          # stochastic rounding
        level.clamp_(max=s)       # |x_i| can exceed the fp32-rounded norm by half an ulp
        codes = torch.where(x >= 0, s + level, s - level).to(torch.int64)
        bitpack.pack_codes(codes, self.bits, layout.view(payload, "codes"))
        return payload

    def _encode_native(self, lib, x, norm: float, seed: int, codes: torch.Tensor) -> None:
        k1, k2 = seed_words(seed)
        lib.hv_qsgd_encode_f32(x.data_ptr(), x.numel(), norm, self.levels, self.bits, k1, k2,
                               codes.data_ptr(), _native.threads(x.numel()))

    def _step(self, payload, numel: int, dtype: torch.dtype):
        """``(layout, step)``: the payload's layout and the decoded value of one level."""
        check_out_dtype(dtype, self.name)
        check_payload(payload, self.payload_nbytes(numel), self.name, numel)
        layout = self._layout(numel)
        if not numel:
            return layout, None
        norm = layout.read(payload, "norm")[0].to(compute_dtype(dtype))
        step = norm / self.levels
        if self.rescale:
            step = step / (1.0 + self.omega(numel))
        return layout, step

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        layout, step = self._step(payload, numel, dtype)
        if not numel:
            return torch.empty(0, dtype=dtype, device=payload.device)
        codes = bitpack.unpack_codes(layout.read(payload, "codes"), numel, self.bits)
        return ((codes - self.levels).to(step.dtype) * step).to(dtype)

    def decompress_into(self, payload, out, seed=0):
        """Decode into ``out``; on CPU with the C kernels (float32 ``out``) in one pass."""
        numel = out.numel()
        layout, step = self._step(payload, numel, out.dtype)
        codes = layout.read(payload, "codes") if numel else None
        lib = _native.usable(codes, out) if numel and out.dtype == torch.float32 else None
        if lib is None:
            return super().decompress_into(payload, out, seed)
        step_value = float(step)        # CPU: no device to wait for
        lib.hv_qsgd_decode_f32(codes.data_ptr(), codes.numel(), numel, self.levels, self.bits,
                               step_value, out.data_ptr(), _native.threads(numel))
        return out
