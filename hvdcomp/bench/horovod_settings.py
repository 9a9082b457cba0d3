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
SETTINGS: Tuple[str, ...] = tuple(HOROVOD_DEFAULTS)


def settings_in_force(env: Optional[Mapping[str, str]] = None,
                      applied: Mapping[str, str] = ()) -> Dict[str, Dict[str, str]]:
    """``{name: {"value": ..., "source": ...}}`` for :data:`SETTINGS` in ``env`` (default: this
    process's environment); ``applied`` names the ones the bench added itself
    (:func:`with_bench_defaults`), every other value set is the user's (``environment``)."""
    env = os.environ if env is None else env
    out = {}
    for name in SETTINGS:
        value = env.get(name)
        if value is None:
            out[name] = {"value": HOROVOD_DEFAULTS[name], "source": "Horovod default"}
        elif name in applied:
            out[name] = {"value": value, "source": "hvdcomp bench default"}
        else:
            out[name] = {"value": value, "source": "environment"}
    return out


def with_bench_defaults(env: Mapping[str, str]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """``env`` with :data:`BENCH_DEFAULTS` added where the user set nothing, and the ones added
    (a user's value is never replaced)."""
    added = {name: value for name, value in BENCH_DEFAULTS.items() if name not in env}
    return {**env, **added}, added
