"""The Horovod settings that shape hvdcomp's collectives, and what is in force.

Horovod's background thread wakes every ``HOROVOD_CYCLE_TIME`` ms to negotiate the collectives
that are ready and fuses tensors up to ``HOROVOD_FUSION_THRESHOLD`` bytes into one. hvdcomp
launches few, large, named collectives per step (one exchange per bucket), so these settings
matter to it differently than to Horovod's many per-parameter allreduces; docs/benchmarks.md
("Horovod settings") has the measurement behind :data:`BENCH_DEFAULTS`.

:func:`settings_in_force` says, for each setting, its value and where it comes from: the
user's environment (always wins), a default ``hvdcomp bench`` applied, or Horovod's own default.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Tuple

#: Horovod 0.28's own defaults (horovod/common/operations.cc: SetCycleTimeMs(1),
#: SetTensorFusionThresholdBytes(128 MiB)), used when the variable is not set
HOROVOD_DEFAULTS: Dict[str, str] = {"HOROVOD_CYCLE_TIME": "1",
                                    "HOROVOD_FUSION_THRESHOLD": str(128 * 1024 * 1024)}
#: what ``hvdcomp bench`` sets for the ranks it launches when the environment does not
BENCH_DEFAULTS: Dict[str, str] = {}
#: what ``hvdcomp train`` sets on CPU ranks (Horovod engine) when the environment does not: at
#: Horovod's 1 ms cycle its idle background thread made a compute-only ResNet-18 step 1.44-1.74x
#: slower on the 2-core benchmark machine, 1.26x at 5 ms (docs/benchmarks.md, 30 Nov 2026)
TRAIN_CPU_DEFAULTS: Dict[str, str] = {"HOROVOD_CYCLE_TIME": "5"}
SETTINGS: Tuple[str, ...] = tuple(HOROVOD_DEFAULTS)


def settings_in_force(env: Optional[Mapping[str, str]] = None,
                      applied: Mapping[str, str] = (),
                      applied_by: str = "hvdcomp bench default") -> Dict[str, Dict[str, str]]:
    """``{name: {"value": ..., "source": ...}}`` for :data:`SETTINGS` in ``env`` (default: this
    process's environment); ``applied`` names the ones hvdcomp added itself (source
    ``applied_by``: :func:`with_bench_defaults`, :func:`apply_train_defaults`), every other
    value set is the user's (``environment``)."""
    env = os.environ if env is None else env
    out = {}
    for name in SETTINGS:
        value = env.get(name)
        if value is None:
            out[name] = {"value": HOROVOD_DEFAULTS[name], "source": "Horovod default"}
        elif name in applied:
            out[name] = {"value": value, "source": applied_by}
        else:
            out[name] = {"value": value, "source": "environment"}
    return out


def describe(settings: Mapping[str, Mapping[str, str]]) -> str:
    """``NAME=value (source), ...`` of :func:`settings_in_force`'s result (tables, summaries)."""
    return ", ".join(f"{name}={s['value']} ({s['source']})" for name, s in settings.items())


def with_bench_defaults(env: Mapping[str, str]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """``env`` with :data:`BENCH_DEFAULTS` added where the user set nothing, and the ones added
    (a user's value is never replaced)."""
    added = {name: value for name, value in BENCH_DEFAULTS.items() if name not in env}
    return {**env, **added}, added


def apply_train_defaults(device: str) -> Dict[str, str]:
    """Before ``hvd.init()`` in ``hvdcomp train``: :data:`TRAIN_CPU_DEFAULTS` into this process's
    environment on CPU ranks, where the user set nothing; returns the ones applied."""
    if device != "cpu":
        return {}
    added: Dict[str, str] = {}
    for name, value in TRAIN_CPU_DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = added[name] = value
    return added
