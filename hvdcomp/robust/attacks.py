"""Simulated faulty (Byzantine) workers, built in parameter space from the honest half-steps.

As in MoNNA's reference code (``attacks/*.py``, research notes §4.3), the f faulty workers all send
the same vector, computed from the honest workers' vectors H (an (n_h, d) tensor) of this step:

* ALIE, "a little is enough" (Baruch et al. 2019):  mean(H) + z·std(H)  (coordinate-wise std);
* FOE, "fall of empires" (Xie et al. 2019):          −ε·mean(H) (Xie et al.'s ε: ε = 0.1 sends
  −0.1·mean(H), the reversed direction, not a 10 % shrink);
* sign flipping:                                      −mean(H);
* label flipping:                                     mean(H) − γ·g_flip, with g_flip the gradient
  on a batch whose labels were flipped (y → C − 1 − y, :func:`flip_labels`);
* mimic (Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
  Bucketing", ICLR 2022):                             H_k, an honest worker's own vector (k = 0 by
  default, as MoNNA's reference ``attacks/mimic.py``; the paper's heuristic choice of k along the
  direction of largest variance is not implemented).

z and ε: by default chosen each step as the MoNNA authors' code does (``attacks/identical.py``
with its default ``factor=-16``): the faulty vector is mean(H) + t·a, a = std(H) for ALIE and
a = −mean(H) for FOE, and t maximises the damage to the defence,
‖(1/n_h) Σ_{i∈H} AGG_i − mean(H)‖², AGG_i being honest node i's aggregate, by the reference's
:func:`line_maximize` (16 evaluations from t = 0). So ALIE's z = t and FOE's ε = t − 1. Against
plain averaging the damage grows without bound and the search walks t up to ~2¹⁵; against NNA it
stops where the faulty vectors would leave the nearest neighbours. A fixed ``param`` (z, or Xie
et al.'s ε) replaces the search; ``search=False`` without one takes the literature's fixed values,
Baruch et al.'s z_max (:func:`alie_default_z`) and Xie et al.'s ε = 0.1. These are simulations
for measuring robustness: :class:`hvdcomp.robust.monna.MoNNA` refuses them unless
``simulate_faults=True``.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable, Optional

import torch

from .aggregators import aggregate

__all__ = ["ATTACKS", "alie", "foe", "sign_flip", "label_flip", "mimic", "flip_labels",
           "alie_default_z",
           "line_maximize", "attack_damage", "attack_vectors"]

ATTACKS = ("alie", "foe", "sign_flip", "label_flip", "mimic")

#: FOE's fixed ε with Xie et al.'s meaning (faulty workers send −ε·mean(H)); used with
#: ``search=False`` and no ``param`` (by default the reference's line search chooses ε)
FOE_DEFAULT_EPSILON = 0.1
#: evaluations of the line search (the reference's ``factor=-16``)
LINE_SEARCH_EVALUATIONS = 16


def _honest(honest: torch.Tensor) -> torch.Tensor:
    if honest.dim() != 2 or honest.shape[0] == 0:
        raise ValueError(f"attacks take the honest vectors as an (n_h, d) tensor with n_h ≥ 1, got "
                         f"shape {tuple(honest.shape)}")
    return honest


def alie(honest: torch.Tensor, z: float) -> torch.Tensor:
    """mean(H) + z·std(H), std coordinate-wise (unbiased; 0 when there is one honest vector)."""
    honest = _honest(honest)
    spread = honest.std(0) if honest.shape[0] > 1 else torch.zeros_like(honest[0])
    return honest.mean(0) + z * spread


def foe(honest: torch.Tensor, epsilon: float) -> torch.Tensor:
    """−ε·mean(H): Xie et al.'s inner-product manipulation (ε > 0 reverses the honest mean)."""
    return -epsilon * _honest(honest).mean(0)


def sign_flip(honest: torch.Tensor) -> torch.Tensor:
    """−mean(H)."""
    return -_honest(honest).mean(0)


def label_flip(honest: torch.Tensor, flipped_gradient: torch.Tensor, lr: float) -> torch.Tensor:
    """mean(H) − lr·g_flip: the honest centre moved by a step on flipped labels."""
    return _honest(honest).mean(0) - lr * flipped_gradient.reshape(-1).to(honest.dtype)


def mimic(honest: torch.Tensor, target: int = 0) -> torch.Tensor:
    """H_target: the faulty workers copy one honest worker, over-weighting its data."""
    honest = _honest(honest)
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < len(honest):
        raise ValueError(f"mimic: the honest worker to copy must be an index in "
                         f"[0, {len(honest)}), got {target!r}")
    return honest[target].clone()


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """y → num_classes − 1 − y (MNIST/CIFAR-10: y → 9 − y), what label-flipping workers train on."""
    if num_classes < 2:
        raise ValueError(f"label flipping needs at least 2 classes, got {num_classes}")
    return (num_classes - 1) - labels


def alie_default_z(n: int, f: int) -> float:
    """Baruch et al. 2019's z_max: s = ⌊n/2 + 1⌋ − f workers must be out-voted, and
    z = Φ⁻¹((n − s)/n), the largest shift the coordinate-wise majority still accepts."""
    s = math.floor(n / 2 + 1) - f
    quantile = (n - s) / n
    if not 0 < quantile < 1:
        raise ValueError(f"ALIE's z formula needs 0 < (n − s)/n < 1; got n = {n}, f = {f}: "
                         "pass z explicitly")
    return NormalDist().inv_cdf(quantile)


def line_maximize(objective: Callable[[float], float], evaluations: int = LINE_SEARCH_EVALUATIONS,
                  start: float = 0.0, delta: float = 1.0, contract: float = 0.8) -> float:
    """Best-effort arg-max of ``objective`` over t ≥ 0 in ``evaluations`` calls: the MoNNA
    reference's ``tools.line_maximize``, step for step.  Expansion: from ``start``, try
    best + delta and double delta while the objective grows; then contraction: delta ·= contract,
    and each probe moves delta from the last probe towards the best point (never below 0)."""
    if evaluations < 1 or start < 0 or not delta > 0 or not 0.5 < contract < 1:
        raise ValueError("line_maximize needs evaluations ≥ 1, start ≥ 0, delta > 0 and "
                         "0.5 < contract < 1")
    best_x, best_y = start, objective(start)
    left = evaluations - 1
    probe = best_x
    while left > 0:                                   # expansion
        probe = best_x + delta
        value = objective(probe)
        left -= 1
        if value > best_y:
            best_x, best_y = probe, value
            delta *= 2
        else:
            delta *= contract
            break
    while left > 0:                                   # contraction
        if probe < best_x:
            probe += delta
        else:
            candidate = probe - delta
            while candidate < 0:
                candidate = (candidate + probe) / 2
            probe = candidate
        value = objective(probe)
        left -= 1
        if value > best_y:
            best_x, best_y = probe, value
        delta *= contract
    return best_x


def _alie_or_foe(attack: str, honest: torch.Tensor, f: int, param: Optional[float],
                 search: Optional[bool], aggregator: str) -> torch.Tensor:
    if search and param is not None:
        raise ValueError(f"{attack}: give either a fixed attack parameter or the line search, "
                         "not both")
    if param is None and search is False:
        n = honest.shape[0] + f
        param = alie_default_z(n, f) if attack == "alie" else FOE_DEFAULT_EPSILON
    if param is not None:
        return alie(honest, param) if attack == "alie" else foe(honest, param)
    # the reference's parametrisation: mean(H) + t·a, searched over t ≥ 0
    centre = honest.mean(0)
    if attack == "alie":
        direction = honest.std(0) if honest.shape[0] > 1 else torch.zeros_like(centre)
    else:
        direction = -centre

    def damage(t: float) -> float:
        return attack_damage(honest, (centre + t * direction).expand(f, -1), aggregator, f)

    return centre + line_maximize(damage) * direction


def attack_damage(honest: torch.Tensor, faulty: torch.Tensor, aggregator: str, f: int) -> float:
    """‖(1/n_h) Σ_{i∈H} AGG_i − mean(H)‖², AGG_i being honest node i's aggregate (pivot: its own
    vector) of the honest vectors and the faulty ones: how far the attack moves the honest nodes."""
    received = torch.cat([honest, faulty])
    outputs = torch.stack([aggregate(aggregator, received, f, pivot=own) for own in honest])
    return float(torch.linalg.vector_norm(outputs.mean(0) - honest.mean(0)) ** 2)


def attack_vectors(attack: str, honest: torch.Tensor, f: int, *, param: Optional[float] = None,
                   search: Optional[bool] = None, aggregator: str = "nna",
                   flipped_gradient: Optional[torch.Tensor] = None,
                   lr: Optional[float] = None) -> torch.Tensor:
    """The (f, d) vectors the f faulty workers send this step (all the same, as in the reference).

    ``param``: a fixed z for ALIE or ε for FOE (Xie et al.'s: −ε·mean(H)), the honest worker
    copied by mimic (default 0).  ALIE and FOE without ``param``: the MoNNA authors' line search
    against ``aggregator`` (module docstring), unless ``search=False``, which takes Baruch et
    al.'s z_max and ε = 0.1.  ``search=True`` with a ``param`` is refused (one or the other).
    Label flipping needs ``lr`` and ``flipped_gradient``: one (d,) gradient for all, or (f, d),
    one per faulty worker."""
    honest = _honest(honest)
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")
    if f == 0:
        return honest.new_zeros((0, honest.shape[1]))
    if attack in ("alie", "foe"):
        vector = _alie_or_foe(attack, honest, f, param, search, aggregator)
    elif attack == "sign_flip":
        vector = sign_flip(honest)
    elif attack == "mimic":
        vector = mimic(honest, 0 if param is None else param)
    else:
        if flipped_gradient is None or lr is None:
            raise ValueError("label_flip needs flipped_gradient (a gradient on flipped labels) "
                             "and lr")
        if flipped_gradient.dim() == 2:  # one flipped gradient per faulty worker
            if flipped_gradient.shape[0] != f:
                raise ValueError(f"label_flip: got {flipped_gradient.shape[0]} flipped gradients "
                                 f"for f = {f} faulty workers")
            return torch.stack([label_flip(honest, g, lr) for g in flipped_gradient])
        vector = label_flip(honest, flipped_gradient, lr)
    return vector.unsqueeze(0).expand(f, -1).clone()
