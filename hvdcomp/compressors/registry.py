"""Compressor names and spec strings: ``"topk:ratio=0.01"``, ``"blocksign:block=1024"``, ``"sign"``.

The spec string is what the CLI, sweep specs and checkpoints carry."""
from __future__ import annotations

from typing import Callable, Dict

from .base import Compressor

REGISTRY: Dict[str, Callable[..., Compressor]] = {}


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


def from_spec(spec: "str | Compressor") -> Compressor:
    """Build a compressor from ``name`` or ``name:key=value,key=value``."""
    if isinstance(spec, Compressor):
        return spec
    _load_builtin()
    name, _, rest = spec.strip().partition(":")
    if name not in REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"compressor spec {spec!r}: expected key=value, got {item!r}")
        kwargs[key.strip()] = _parse_value(value.strip())
    try:
        return REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"compressor spec {spec!r}: {exc}") from None


def _load_builtin() -> None:
    # Importing the modules registers their classes.
    from . import cast, lowrank, quantize, sign, sparse  # noqa: F401
