"""CSER: communication-efficient SGD with error reset (local residuals, periodic reset).

Xie, Zheng, Koyejo, Gupta, Li, Lin, "CSER: Communication-efficient SGD with Error Reset",
NeurIPS 2020 (arXiv 2007.13221); as LIEC-SGD's authors ran it as their baseline
(github.com/chengyif/LIEC-SGD, ``main.py``, method ``cser``, H = 8; research notes §1.4).
Worker i keeps its own model x_i; round t, unless (t+1) mod H = 0::

    send C₁(g_i) ;  r_i = g_i − C₁(g_i)
    u_i = (1/n) Σ_j C₁(g_j) + r_i          (the mean comes back dense; r_i applied at once)
    ê_i ← ê_i − η r_i                       (x_i − x̄ = ê_i − mean_j ê_j: the models bifurcate)

Error reset, (t+1) mod H = 0: x_i ← x_i − ê_i + (1/n) Σ_j C₂(ê_j) + (ê_i − C₂(ê_i)),
ê_i ← ê_i − C₂(ê_i).

What hvdcomp runs: the reset with C₂ = identity, the paper's exact reset. Then the reset makes
every x_i equal to the average model, and with that round's step it is exactly an exact round of
:mod:`hvdcomp.exchange`: the optimizer averages the parameters (x_i ← x̄, which is
x_i − ê_i + mean_j ê_j, because x_i − ê_i is the same on every worker) and applies
u = (1/n) Σ_j g_j (the mean of C₁(g_j) + r_j). So ê_i needs no storage: the reset only needs
x̄ (derivation in docs/algorithms.md).

Departure from the LIEC-SGD code's CSER: that code compresses the reset too (C₂ = scaled sign,
one extra 1-bit exchange every H rounds, error kept in gradient units). A compressed reset needs
two compressed exchanges in one round, which the exchange does not offer; hvdcomp's reset is
exact and costs one dense gradient allreduce plus one dense parameter allreduce every H rounds
(per coordinate and round, up: (H − 1)/H · bits(C₁) + 64/H; down: (H − 1)/H · 32 + 64/H).
"""
from __future__ import annotations

from typing import Dict

import torch

from .base import Algorithm
from .registry import MethodInfo, Option, Paper

__all__ = ["CSER"]


class CSER(Algorithm):
    """CSER with error reset every ``period`` = H rounds (8 in the LIEC-SGD code), C₂ = identity.

    State: r_i for the current round only (``local_error``); the accumulated error ê_i is the
    model's own drift from the average, kept in the parameters themselves."""
    name = "cser"
    info = MethodInfo(
        name="cser", label="CSER", order=120,
        summary="local residuals applied at once, the models reset to their average every "
                "period rounds",
        paper=Paper("CSER: Communication-efficient SGD with Error Reset",
                    "Xie, Zheng, Koyejo, Gupta, Li, Lin", 2020,
                    "https://arxiv.org/abs/2007.13221", "NeurIPS"),
        options=(Option("period", "int", 8, "an integer >= 1", "rounds between error resets"),))
    compresses_downlink = False  # the mean of C₁(g_j) returns dense, as in the reference code
    worker_residual = "compensated"  # r_i = g_i − C₁(g_i), u_i = mean + r_i

    def __init__(self, up="none", down=None, period: int = 8):
        super().__init__(up, down)
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"cser: period must be a positive integer (rounds between error "
                             f"resets), not {period!r}")
        self.period = period
        self.local_error: Dict[str, torch.Tensor] = {}   # r_i, whole bucket, this round only

    def hyperparameters(self):
        return {"period": self.period}

    def is_sync_step(self) -> bool:
        return (self.step + 1) % self.period == 0        # error reset: exact round

    def worker_sent(self, key, message, sent):
        # r_i over C₁(g_i), in the exchange's buffer (the algorithm's until worker_update)
        self.local_error[key] = torch.sub(message, sent, out=sent)  # r_i = g_i − C₁(g_i)

    def worker_update(self, key, received):
        return received.add_(self.local_error.pop(key))  # u_i = mean_j C₁(g_j) + r_i
