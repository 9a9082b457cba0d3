"""MoNNA's baseline aggregation rules: Krum, the geometric median (RFA), centered clipping.

Same interface as :mod:`.aggregators`: ``rule(vectors, f, pivot, **options)`` on an (n, d)
tensor, returning one d-vector. In MoNNA's peer-to-peer step every honest node applies the rule
to the n models it received, with its own half-step as ``pivot``.

* Krum — Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent", NeurIPS 2017::

      score(i) = Σ_{j ∈ N_i} ‖V_i − V_j‖²,  N_i = the n − f − 2 vectors closest to V_i (j ≠ i)
      Krum(V_1..V_n) = V_{i*},  i* = argmin_i score(i)                (needs n > 2f + 2)

  (MoNNA's reference code ``aggregators/krum.py`` sums plain distances over n − f − 1
  neighbours; this is the paper's rule.)

* Geometric median by the smoothed Weiszfeld algorithm — Pillutla, Kakade, Harchaoui, "Robust
  Aggregation for Federated Learning" (arXiv 1912.13445, RFA), as in the authors' code
  (github.com/krishnap25/RFA, ``models/model.py``: start at the mean, ν = 1e-5, at most 4
  iterations, stop when the objective improves by less than 1e-6 relative)::

      α_i = 1/n;  z⁰ = Σ_i α_i V_i
      β_i = α_i / max(ν, ‖z − V_i‖);  z ← Σ_i β_i V_i / Σ_i β_i        (repeat)
      objective F(z) = Σ_i α_i ‖z − V_i‖

* Centered clipping — Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
  Optimization", ICML 2021; peer-to-peer, centred on the node's own vector (self-centred
  clipping, as MoNNA's reference runs it: radius τ = 2 on MNIST, 3 iterations)::

      v⁰ = pivot;  v^{l+1} = v^l + (1/n) Σ_i (V_i − v^l) · min(1, τ / ‖V_i − v^l‖),  l < L
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .aggregators import _check_f, _stack

__all__ = ["krum", "geometric_median", "centered_clip"]


def krum(vectors, f: int = 0, pivot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The vector with the smallest sum of squared distances to its n − f − 2 nearest others;
    ties go to the lowest index, so every rank picks the same."""
    stacked = _stack(vectors)
    n = stacked.shape[0]
    _check_f(f, n, None)
    if not n > 2 * f + 2:
        raise ValueError(f"krum scores each vector by its n − f − 2 nearest neighbours: needs "
                         f"n > 2f + 2, got n = {n}, f = {f}")
    # one row at a time: n × d memory, not n × n × d (models have millions of coordinates)
    squared = torch.stack([((stacked - row) ** 2).sum(1) for row in stacked])
    squared.fill_diagonal_(math.inf)                    # j ≠ i
    nearest = torch.sort(squared, dim=1).values[:, :n - f - 2]
    scores = nearest.sum(1)
    best = int(torch.argmin(scores))                    # first minimum: lowest index wins ties
    return stacked[best].clone()


def geometric_median(vectors, f: int = 0, pivot: Optional[torch.Tensor] = None,
                     nu: float = 1e-5, iterations: int = 4, ftol: float = 1e-6) -> torch.Tensor:
    """Smoothed Weiszfeld (module docstring). ``f`` and ``pivot`` are not used: the geometric
    median needs neither (its breakdown point is 1/2)."""
    stacked = _stack(vectors)
    if not nu > 0:
        raise ValueError(f"rfa: nu (the smoothing) must be positive, got {nu!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"rfa: iterations must be a positive integer, got {iterations!r}")
    n = stacked.shape[0]
    alphas = torch.full((n,), 1.0 / n, dtype=stacked.dtype, device=stacked.device)
    median = (alphas[:, None] * stacked).sum(0)
    objective = float((alphas * torch.linalg.vector_norm(stacked - median, dim=1)).sum())
    for _ in range(iterations):
        distances = torch.linalg.vector_norm(stacked - median, dim=1)
        betas = alphas / torch.clamp(distances, min=nu)
        median = (betas[:, None] * stacked).sum(0) / betas.sum()
        previous, objective = objective, float(
            (alphas * torch.linalg.vector_norm(stacked - median, dim=1)).sum())
        if abs(previous - objective) < ftol * objective:
            break
    return median


def centered_clip(vectors, f: int = 0, pivot: Optional[torch.Tensor] = None,
                  radius: float = 2.0, iterations: int = 3) -> torch.Tensor:
    """``iterations`` steps of clipping every vector's offset from the centre to ``radius`` and
    moving the centre by the mean clipped offset, starting at ``pivot``."""
    stacked = _stack(vectors)
    if pivot is None:
        raise ValueError("cclip needs the pivot: the node's own vector, the first centre")
    if not radius > 0:
        raise ValueError(f"cclip: radius (the clipping threshold τ) must be positive, got "
                         f"{radius!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"cclip: iterations must be a positive integer, got {iterations!r}")
    centre = pivot.reshape(-1).to(stacked.dtype)
    if centre.numel() != stacked.shape[1]:
        raise ValueError(f"cclip: the pivot has {centre.numel()} elements, the vectors "
                         f"{stacked.shape[1]}")
    for _ in range(iterations):
        offsets = stacked - centre
        norms = torch.linalg.vector_norm(offsets, dim=1)
        scale = torch.clamp(radius / norms, max=1.0)    # ‖offset‖ = 0: 1/0 = inf, clamped to 1
        centre = centre + (offsets * scale[:, None]).mean(0)
    return centre
