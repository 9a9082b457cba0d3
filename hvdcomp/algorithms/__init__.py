"""Algorithms: error feedback written as the five steps of :mod:`.base`, one module per method.

    make_algorithm("liec", up="sign", down="sign", period=32)

Every subclass of :class:`Algorithm` that sets ``name`` registers itself when its module is
imported, together with its :class:`~.registry.MethodInfo`; this package imports every module in
it (:func:`.registry.load_all`), so a new method is one new module here.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

from .base import ALGORITHMS, Algorithm
from .registry import METHODS, MethodInfo, Option, Paper, TrainingMethod, load_all

load_all()  # every module of this package: each registers the methods it defines


def make_algorithm(name: str, up: Any = "none", down: Optional[Any] = None,
                   **hyper: Any) -> Algorithm:
    """The algorithm ``name`` with uplink compressor ``up`` and downlink compressor ``down``
    (compressors or spec strings; ``down`` defaults to ``up``) and its hyperparameters.

    Raises ValueError naming the problem for an unknown algorithm or hyperparameter."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of: "
                         f"{', '.join(sorted(ALGORITHMS))}")
    cls = ALGORITHMS[name]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "up", "down")
                and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                           inspect.Parameter.VAR_KEYWORD)]
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(hyper) - set(accepted))
    if unknown and not takes_any:
        raise ValueError(f"algorithm {name!r} has no parameter(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(accepted) or 'none'}")
    return cls(up=up, down=down, **hyper)


__all__ = ["Algorithm", "ALGORITHMS", "METHODS", "MethodInfo", "Option", "Paper",
           "TrainingMethod", "make_algorithm"]
