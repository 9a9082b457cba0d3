"""Compressor names and spec strings: ``"topk:ratio=0.01"``, ``"blocksign:block=1024"``, ``"sign"``.

The spec string is what the CLI, sweep specs and checkpoints carry. :func:`from_spec` checks a
spec completely when it is parsed — the name, every parameter's name, type and range (each
compressor's constructor checks its own ranges and lists them in ``parameters``), repeated
parameters — so that a bad value stops a run before it starts rather than as a NaN later."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Callable, Dict, List

from ..errors import UserError
from .base import Compressor

REGISTRY: Dict[str, Callable[..., Compressor]] = {}


class CompressorSpecError(UserError, ValueError):
    """A compressor spec that names no compressor, or a parameter it lacks or cannot take."""


def register(name: str):
    def deco(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


def _parse_value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parameter_ranges(cls) -> Dict[str, str]:
    """Parameter -> valid values in words, for a registered compressor class (names from the
    constructor's signature when the class declares none)."""
    if cls.parameters is not None:
        return dict(cls.parameters)
    names = [p.name for p in inspect.signature(cls.__init__).parameters.values()
             if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {name: "see its docstring" for name in names}


def describe_parameters(name: str) -> str:
    """``"topk takes ratio (a number in (0, 1], default 0.01), fp16_values (...)"``."""
    cls = REGISTRY[name]
    ranges = parameter_ranges(cls)
    if not ranges:
        return f"{name} takes no parameters"
    defaults = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()}
    parts = []
    for key, valid in ranges.items():
        default = defaults.get(key, inspect.Parameter.empty)
        shown = "" if default is inspect.Parameter.empty else f", default {_spec_value(default)}"
        parts.append(f"{key} ({valid}{shown})")
    return f"{name} takes " + ", ".join(parts)


def _spec_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def from_spec(spec: "str | Compressor") -> Compressor:
    """Build a compressor from ``name`` or ``name:key=value,key=value``. Raises
    CompressorSpecError (a ValueError) naming the compressor, the problem and the valid values
    (callers add the spec and the option it came from)."""
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise CompressorSpecError(f"compressor spec must be a string such as 'sign', got "
                                  f"{type(spec).__name__} {spec!r}")
    _load_builtin()
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in REGISTRY:
        raise CompressorSpecError(f"unknown compressor {name!r}; choose one of: "
                                  f"{', '.join(sorted(REGISTRY))}")
    ranges = parameter_ranges(REGISTRY[name])
    kwargs = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise CompressorSpecError(f"{name}: expected key=value, got {item!r}; "
                                      f"{describe_parameters(name)}")
        if key not in ranges:
            raise CompressorSpecError(f"{name}: unknown parameter {key!r}; "
                                      f"{describe_parameters(name)}")
        if key in kwargs:
            raise CompressorSpecError(f"{name}: {key} is given twice in {spec!r}")
        kwargs[key] = _parse_value(value.strip())
    try:
        return REGISTRY[name](**kwargs)
    except (TypeError, ValueError) as exc:  # the constructor's range checks name the compressor
        raise CompressorSpecError(str(exc)) from None


def registered_names() -> List[str]:
    _load_builtin()
    return sorted(REGISTRY)


def _load_builtin() -> None:
    """Import every public module of :mod:`hvdcomp.compressors` (importing one registers its
    classes), so adding a compressor is adding one module (docs/extending.md)."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
