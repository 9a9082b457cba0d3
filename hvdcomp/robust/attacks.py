"""Simulated faulty (Byzantine) workers, built in parameter space from the honest half-steps.

As in MoNNA's reference code (``attacks/*.py``, research notes §4.3), the f faulty workers all send
the same vector, computed from the honest workers' vectors H (an (n_h, d) tensor) of this step:

* ALIE, "a little is enough" (Baruch et al. 2019):  mean(H) + z·std(H)  (coordinate-wise std);
* FOE, "fall of empires" (Xie et al. 2019):          mean(H) − ε·mean(H);
* sign flipping:                                      −mean(H);
* label flipping:                                     mean(H) − γ·g_flip, with g_flip the gradient
  on a batch whose labels were flipped (y → C − 1 − y, :func:`flip_labels`);
* mimic (Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
  Bucketing", ICLR 2022):                             H_k, an honest worker's own vector (k = 0 by
  default, as MoNNA's reference ``attacks/mimic.py``; the paper's heuristic choice of k along the
  direction of largest variance is not implemented).

z and ε: the reference chooses them each step by a line search that maximises the damage to the
defence, ‖(1/n_h) Σ_{i∈H} AGG_i − mean(H)‖² (16 evaluations). Here a fixed value is the default
(z from Baruch et al.'s formula, :func:`alie_default_z`; ε = 0.1) and ``search=True`` runs
:func:`line_maximize` with the same objective. These are simulations for measuring robustness:
:class:`hvdcomp.robust.monna.MoNNA` refuses them unless ``simulate_faults=True``.
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

#: FOE's default ε (Xie et al. 2019 use small ε such as 0.1 [UNVERIFIED]; the reference searches it)
FOE_DEFAULT_EPSILON = 0.1


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
    """mean(H) − ε·mean(H) = (1 − ε)·mean(H)."""
    centre = _honest(honest).mean(0)
    return centre - epsilon * centre


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


def line_maximize(objective: Callable[[float], float], start: float = 1.0,
                  evaluations: int = 16, expand: float = 2.0, contract: float = 0.8) -> float:
    """A small derivative-free maximiser over a positive scalar (the role of the reference's
    ``tools.line_maximize``): double the argument while the objective grows, then shrink it by
    ``contract`` from the best point found, keeping the best of ``evaluations`` evaluations."""
    if evaluations < 1 or not start > 0 or not expand > 1 or not 0 < contract < 1:
        raise ValueError("line_maximize needs evaluations ≥ 1, start > 0, expand > 1 and "
                         "0 < contract < 1")
    best_x, best_value = start, objective(start)
    used, x = 1, start
    while used < evaluations:
        x = x * expand
        value = objective(x)
        used += 1
        if value > best_value:
            best_x, best_value = x, value
        else:
            break
    x = best_x
    while used < evaluations:
        x = x * contract
        value = objective(x)
        used += 1
        if value > best_value:
            best_x, best_value = x, value
    return best_x


def attack_damage(honest: torch.Tensor, faulty: torch.Tensor, aggregator: str, f: int) -> float:
    """‖(1/n_h) Σ_{i∈H} AGG_i − mean(H)‖², AGG_i being honest node i's aggregate (pivot: its own
    vector) of the honest vectors and the faulty ones: how far the attack moves the honest nodes."""
    received = torch.cat([honest, faulty])
    outputs = torch.stack([aggregate(aggregator, received, f, pivot=own) for own in honest])
    return float(torch.linalg.vector_norm(outputs.mean(0) - honest.mean(0)) ** 2)


def attack_vectors(attack: str, honest: torch.Tensor, f: int, *, param: Optional[float] = None,
                   search: bool = False, aggregator: str = "nna",
                   flipped_gradient: Optional[torch.Tensor] = None,
                   lr: Optional[float] = None) -> torch.Tensor:
    """The (f, d) vectors the f faulty workers send this step (all the same, as in the reference).

    ``param``: z for ALIE (default :func:`alie_default_z`), ε for FOE (default 0.1), the honest
    worker copied by mimic (default 0); with
    ``search=True`` it is the line search's starting point and the value maximising
    :func:`attack_damage` against ``aggregator`` is used. Label flipping needs ``lr`` and
    ``flipped_gradient``: one (d,) gradient for all, or (f, d), one per faulty worker."""
    honest = _honest(honest)
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")
    if f == 0:
        return honest.new_zeros((0, honest.shape[1]))
    if attack in ("alie", "foe"):
        build = (lambda p: alie(honest, p)) if attack == "alie" else (lambda p: foe(honest, p))
        if param is None:
            n = honest.shape[0] + f
            param = alie_default_z(n, f) if attack == "alie" else FOE_DEFAULT_EPSILON
        if search:
            start = abs(param) if param else 1.0

            def damage(p: float) -> float:
                return attack_damage(honest, build(p).expand(f, -1), aggregator, f)

            param = line_maximize(damage, start=start)
        vector = build(param)
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
