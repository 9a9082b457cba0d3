"""Algorithms: error feedback written as the five steps of :mod:`.base`, one module per method.

    make_algorithm("liec", up="sign", down="sign", period=32)

Every subclass of :class:`Algorithm` that sets ``name`` registers itself when its module is
imported; this package imports the built-in modules.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Optional

from .base import ALGORITHMS, Algorithm
from . import doublesqueeze, liec, memsgd, psgd  # noqa: F401  (registers the classes)
from . import cser, ef21pp, neolithic  # noqa: F401  (LIEC-SGD's and EF21's baselines)

# Modules other engineers add; a module that does not exist yet is skipped, one that fails to
# import for any other reason raises.
for _module in ("ef21", "dgc", "monna"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_module}":
            raise


def make_algorithm(name: str, up: Any = "none", down: Optional[Any] = None,
                   **hyper: Any) -> Algorithm:
    """The algorithm ``name`` with uplink compressor ``up`` and downlink compressor ``down``
    (compressors or spec strings; ``down`` defaults to ``up``) and its hyperparameters.

    Raises ValueError naming the problem for an unknown algorithm or hyperparameter."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {', '.join(sorted(ALGORITHMS))}")
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


__all__ = ["Algorithm", "ALGORITHMS", "make_algorithm"]
