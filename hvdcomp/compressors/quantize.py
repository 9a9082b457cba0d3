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

from . import bitpack
from ._wire import (Layout, LayoutCompressor, check_bool, check_int, check_out_dtype, check_payload, compute_dtype,
                    flat_input, generator, mix_seeds)
from .base import check_finite
from .registry import register


@register("qsgd")
class QSGD(LayoutCompressor):
    """QSGD with ``levels`` = s quantization levels per sign (s in [1, 127]).

    Each element is coded as c = s + sign·ξ ∈ [0, 2s] in b = ceil(log2(2s+1)) bits, packed
    LSB-first (s=1: 2 bits, s=2,3: 3 bits, s=4..7: 4 bits, ..., s=64..127: 8 bits).
    Bytes: 4 + ceil(d·b/8) (the fp32 norm, then the codes); 0 when d = 0.
    δ: see the module docstring (ω = min(d/s², √d/s); δ = 1/(1+ω) with ``rescale``).

    The Bernoulli draws come from a generator seeded with ``mix_seeds(seed)`` on x's device, so a
    payload is reproducible from (x, seed).  The exchange passes one seed to all ranks for a
    chunk and step, so workers draw the same uniforms; mix the rank into ``seed`` where
    independent noise across workers matters.  The norm is rounded to fp32 before quantizing, so
    the decoded values are unbiased for the norm that travels.

    Cost: a norm, a few element-wise passes, the RNG and the code packing: memory-bound, with the
    packing's int64 intermediates (8 bytes per element) the largest term.  Not linear."""

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
        scaled = x.to(acc, copy=True).abs_().div_(safe_norm).mul_(s)  # in [0, s]; never touch x
        uniforms = torch.rand(numel, generator=generator(mix_seeds(seed), x.device),
                              dtype=acc, device=x.device)
        level = scaled.floor()
        level += uniforms < (scaled - level)                          # stochastic rounding
        level.clamp_(max=s)       # |x_i| can exceed the fp32-rounded norm by half an ulp
        codes = torch.where(x >= 0, s + level, s - level).to(torch.int64)
        bitpack.pack_codes(codes, self.bits, layout.view(payload, "codes"))
        return payload

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        check_out_dtype(dtype, self.name)
        check_payload(payload, self.payload_nbytes(numel), self.name, numel)
        if not numel:
            return torch.empty(0, dtype=dtype, device=payload.device)
        layout = self._layout(numel)
        acc = compute_dtype(dtype)
        norm = layout.read(payload, "norm")[0].to(acc)
        step = norm / self.levels
        if self.rescale:
            step = step / (1.0 + self.omega(numel))
        codes = bitpack.unpack_codes(layout.read(payload, "codes"), numel, self.bits)
        return ((codes - self.levels).to(acc) * step).to(dtype)
