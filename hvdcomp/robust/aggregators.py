"""Aggregation rules for robust mixing of n vectors (models or gradients), f of which may be faulty.

Every rule takes ``vectors``, an (n, d) tensor (or a sequence of n 1-D tensors), and returns one
1-D tensor of d elements:

* :func:`nna` — nearest-neighbour averaging (MoNNA, Farhadkhani et al. ICML 2023; reference code
  ``aggregators/cva.py``): the mean of the n − f vectors closest in L2 to a pivot (the node's own
  model);
* :func:`trimmed_mean` — coordinate-wise: drop the f largest and f smallest values, average the rest
  (Yin et al. 2018), needs n > 2f;
* :func:`median` — coordinate-wise median (the mean of the two middle values when n is even);
* :func:`mean` — plain averaging (D-SGD), the non-robust baseline;
* :func:`krum`, :func:`geometric_median` (RFA), :func:`centered_clip` — MoNNA's baselines, in
  :mod:`.baselines` (Krum, Blanchard et al. 2017; smoothed Weiszfeld, Pillutla et al. 2019;
  centered clipping, Karimireddy et al. 2021).

About how many vectors NNA keeps: the reference code lets node i use a set S of n − f received
vectors (its own, n − 2f − 1 honest ones at random and the f faulty ones) and averages the
|S| − f = n − 2f closest. Here the node receives all n (an allgather) and averages n − f of them, as
hvdcomp's issue describes; pass the subset yourself to get the reference's variant.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Union

import torch

__all__ = ["nna", "trimmed_mean", "median", "mean", "krum", "geometric_median", "centered_clip",
           "aggregate", "AGGREGATORS", "AGGREGATOR_OPTIONS", "check_aggregator_options"]

Vectors = Union[torch.Tensor, Sequence[torch.Tensor]]


def _stack(vectors: Vectors) -> torch.Tensor:
    stacked = vectors if isinstance(vectors, torch.Tensor) else torch.stack(list(vectors))
    if stacked.dim() != 2 or stacked.shape[0] == 0:
        raise ValueError(f"aggregators take an (n, d) tensor of n ≥ 1 vectors, got shape "
                         f"{tuple(stacked.shape)}")
    if not stacked.is_floating_point():
        raise ValueError(f"aggregators need floating-point vectors, got {stacked.dtype}")
    return stacked


def _check_f(f: int, n: int, need: str) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f (the number of faulty vectors tolerated) must be an int ≥ 0, "
                         f"got {f!r}")
    if need == "n>f" and not n > f:
        raise ValueError(f"nna keeps n − f vectors: needs n > f, got n = {n}, f = {f}")
    if need == "n>2f" and not n > 2 * f:
        raise ValueError(f"trimmed_mean drops 2f values per coordinate: needs n > 2f, got "
                         f"n = {n}, f = {f}")
    return f


def mean(vectors: Vectors, f: int = 0, pivot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain average (ignores ``f`` and ``pivot``): what D-SGD does; faulty vectors pull it."""
    return _stack(vectors).mean(0)


def median(vectors: Vectors, f: int = 0, pivot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Coordinate-wise median; for even n the mean of the two middle values (torch.median would
    return the lower one)."""
    stacked = _stack(vectors)
    ordered = stacked.sort(dim=0).values
    n = stacked.shape[0]
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(vectors: Vectors, f: int = 0,
                 pivot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Coordinate-wise trimmed mean: per coordinate, drop the f smallest and f largest values and
    average the n − 2f left."""
    stacked = _stack(vectors)
    n = stacked.shape[0]
    _check_f(f, n, "n>2f")
    ordered = stacked.sort(dim=0).values
    return ordered[f:n - f].mean(0)


def nna(vectors: Vectors, f: int = 0, pivot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Nearest-neighbour averaging: the mean of the n − f vectors closest (L2) to ``pivot``.

    ``pivot`` is the node's own model (MoNNA's θ_i^{t+1/2}); it need not be one of ``vectors``.
    Ties in distance are broken by position (a stable sort), so every rank computes the same."""
    stacked = _stack(vectors)
    n = stacked.shape[0]
    _check_f(f, n, "n>f")
    if pivot is None:
        raise ValueError("nna needs the pivot: the node's own vector, to which it measures "
                         "distances")
    pivot = pivot.reshape(-1).to(stacked.dtype)
    if pivot.numel() != stacked.shape[1]:
        raise ValueError(f"nna: the pivot has {pivot.numel()} elements, the vectors "
                         f"{stacked.shape[1]}")
    distances = torch.linalg.vector_norm(stacked - pivot, dim=1)
    nearest = torch.sort(distances, stable=True).indices[:n - f]
    return stacked[nearest].mean(0)


from .baselines import centered_clip, geometric_median, krum  # noqa: E402  (they use _stack)

#: name → rule(vectors, f, pivot)
AGGREGATORS: Dict[str, Callable[..., torch.Tensor]] = {
    "nna": nna, "trimmed_mean": trimmed_mean, "median": median, "mean": mean,
    "krum": krum, "rfa": geometric_median, "cclip": centered_clip,
}
#: options each rule accepts beyond (vectors, f, pivot)
AGGREGATOR_OPTIONS: Dict[str, tuple] = {"rfa": ("nu", "iterations"),
                                        "cclip": ("radius", "iterations")}


def aggregate(name: str, vectors: Vectors, f: int = 0,
              pivot: Optional[torch.Tensor] = None, **options) -> torch.Tensor:
    """Apply the rule called ``name`` (one of :data:`AGGREGATORS`) with its ``options``
    (:data:`AGGREGATOR_OPTIONS`; an option the rule does not take is an error)."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of: {', '.join(AGGREGATORS)}")
    check_aggregator_options(name, options)
    return AGGREGATORS[name](vectors, f, pivot, **options)


def check_aggregator_options(name: str, options) -> None:
    unknown = sorted(set(options) - set(AGGREGATOR_OPTIONS.get(name, ())))
    if unknown:
        accepted = ", ".join(AGGREGATOR_OPTIONS.get(name, ())) or "none"
        raise ValueError(f"aggregator {name!r} has no option(s) {', '.join(unknown)}; it "
                         f"accepts: {accepted}")
