"""Theoretical stepsizes of EF21 and EF21-W, for users who know their smoothness constants.

Definitions (research notes §2.1; Richtárik, Sokolov, Fatkhullin 2021, Thm 1; Richtárik, Gasanov,
Burlachenko, "Error Feedback Reloaded", ICLR 2024):

* a contractive compressor satisfies E‖C(x) − x‖² ≤ (1 − α)‖x‖², 0 < α ≤ 1 (top-k: α = k/d);
* θ = 1 − √(1 − α) and β = (1 − α)/(1 − √(1 − α)) (the optimised choice of the Young parameter);
* ξ(α) = √(β/θ) = √(1 − α)/(1 − √(1 − α)), which is 0 for α = 1 (no compression) and ≤ 2/α − 1;
* L_QM = √((1/n) Σ L_i²) (EF21's L̃) and L_AM = (1/n) Σ L_i, with L_AM ≤ L_QM;
* EF21 (non-convex, Thm 1):            γ ≤ 1 / (L + L_QM · ξ(α));
* EF21-W (and EF21 by the improved analysis of the ICLR 2024 paper): γ ≤ 1 / (L + L_AM · ξ(α));
* EF21 under the PL condition with constant μ: γ ≤ min{1 / (L + L_QM √(2β/θ)), θ / (2μ)}.

Example, top-1 on d = 20 coordinates with L = 1 and clients' constants ``Ls``::

    gamma = ef21_stepsize(L=1.0, client_smoothness=Ls, alpha=topk_alpha(1, 20))
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

__all__ = ["ef21_theta_beta", "ef21_xi", "quadratic_mean", "arithmetic_mean", "topk_alpha",
           "ef21_stepsize", "ef21w_stepsize", "ef21_pl_stepsize", "ef21w_weights",
           "logistic_smoothness"]


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"the contraction parameter alpha must lie in (0, 1], got {alpha}; "
                         "top-k on d coordinates has alpha = k/d")
    return alpha


def _check_smoothness(values: Sequence[float], what: str) -> list:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{what} is empty: pass one smoothness constant L_i per client")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"{what} must be finite and non-negative, got {values}")
    return values


def ef21_theta_beta(alpha: float) -> Tuple[float, float]:
    """(θ, β) of research notes §2.1 for a compressor with contraction parameter ``alpha``."""
    alpha = _check_alpha(alpha)
    root = math.sqrt(1.0 - alpha)
    theta = 1.0 - root
    beta = (1.0 - alpha) / theta
    return theta, beta


def ef21_xi(alpha: float) -> float:
    """ξ(α) = √(β/θ) = √(1 − α)/(1 − √(1 − α)); 0 when α = 1 (the compressor is the identity)."""
    alpha = _check_alpha(alpha)
    if alpha == 1.0:
        return 0.0
    theta, beta = ef21_theta_beta(alpha)
    return math.sqrt(beta / theta)


def quadratic_mean(values: Sequence[float]) -> float:
    """L_QM = √((1/n) Σ L_i²)."""
    values = _check_smoothness(values, "client_smoothness")
    return math.sqrt(sum(v * v for v in values) / len(values))


def arithmetic_mean(values: Sequence[float]) -> float:
    """L_AM = (1/n) Σ L_i."""
    values = _check_smoothness(values, "client_smoothness")
    return sum(values) / len(values)


def topk_alpha(k: int, d: int) -> float:
    """Contraction parameter of top-k (and of scaled random-k in expectation): α = k/d."""
    if not 0 < k <= d:
        raise ValueError(f"top-k needs 0 < k <= d, got k={k}, d={d}")
    return k / d


def ef21_stepsize(L: float, client_smoothness: Sequence[float], alpha: float) -> float:
    """EF21's non-convex stepsize (Richtárik et al. 2021, Thm 1): 1 / (L + L_QM · ξ(α)).

    ``L`` is the smoothness constant of f = (1/n) Σ f_i, ``client_smoothness`` the L_i."""
    return 1.0 / (float(L) + quadratic_mean(client_smoothness) * ef21_xi(alpha))


def ef21w_stepsize(L: float, client_smoothness: Sequence[float], alpha: float) -> float:
    """EF21-W's stepsize (Error Feedback Reloaded, ICLR 2024): 1 / (L + L_AM · ξ(α)).

    Never smaller than :func:`ef21_stepsize`; the gain grows with the spread of the L_i."""
    return 1.0 / (float(L) + arithmetic_mean(client_smoothness) * ef21_xi(alpha))


def ef21_pl_stepsize(L: float, client_smoothness: Sequence[float], alpha: float,
                     mu: float) -> float:
    """EF21 under the PL condition (constant ``mu``): min{1/(L + L_QM √(2β/θ)), θ/(2μ)}."""
    if not mu > 0:
        raise ValueError(f"the PL constant mu must be positive, got {mu}")
    theta, beta = ef21_theta_beta(alpha)
    first = 1.0 / (float(L) + quadratic_mean(client_smoothness) * math.sqrt(2.0 * beta / theta))
    return min(first, theta / (2.0 * float(mu)))


def ef21w_weights(client_smoothness: Sequence[float]) -> list:
    """EF21-W's client weights w_i = L_i / Σ_j L_j."""
    values = _check_smoothness(client_smoothness, "client_smoothness")
    total = sum(values)
    if total <= 0:
        raise ValueError("EF21-W weights need at least one positive smoothness constant L_i")
    if any(v == 0 for v in values):
        raise ValueError("EF21-W divides by n·w_i: every smoothness constant L_i must be positive")
    return [v / total for v in values]


def logistic_smoothness(features, regulariser: float = 0.0) -> float:
    """Smoothness constant of the mean logistic loss on rows of ``features`` plus the non-convex
    regulariser λ Σ x_j²/(1 + x_j²): L = λ_max(AᵀA)/(4 m) + 2λ (EF21 experiments, research §2.2).

    ``features`` is an (m, d) tensor or array; the regulariser's second derivative is bounded by 2λ.
    """
    import torch

    a = torch.as_tensor(features, dtype=torch.float64)
    if a.dim() != 2 or a.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (samples, dim) matrix, got "
                         f"{tuple(a.shape)}")
    top = torch.linalg.eigvalsh(a.T @ a)[-1].item()
    return top / (4.0 * a.shape[0]) + 2.0 * float(regulariser)
