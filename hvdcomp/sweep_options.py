"""The ``hvdcomp train`` options a sweep spec may set, and how each is written on the command line.

Read from the real ``hvdcomp train`` Click command when it imports (its parameter types convert
and check the values, so a misspelt option or a non-number is caught when the spec is read), and
from :data:`FALLBACK_TRAIN_OPTIONS` otherwise (a login node without torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

#: ``hvdcomp train`` options when ``hvdcomp.cli.train`` cannot be imported (the login node of a
#: cluster may lack torch): name -> accepted Python types. Mirrors cli/train.py; ``bool`` marks a
#: switch, a ``list`` a repeatable option.
FALLBACK_TRAIN_OPTIONS: Dict[str, Tuple[type, ...]] = {
    "model": (str,), "dataset": (str,), "data-dir": (str,), "non-iid": (float,),
    "augment": (bool,), "algorithm": (str,), "compressor": (str,), "up": (str,), "down": (str,),
    "down-compressor": (str,), "period": (int,), "algorithm-option": (list,),
    "bucket-bytes": (int,), "epochs": (int,), "steps": (int,), "batch-size": (int,),
    "lr": (float,), "momentum": (float,), "weight-decay": (float,), "nesterov": (bool,),
    "schedule": (str,), "milestones": (str,), "warmup-epochs": (float,), "seed": (int,),
    "out": (str,), "overwrite": (bool,), "resume": (bool,), "log-every": (int,),
    "checkpoint-every": (int, str), "keep-checkpoints": (int,), "device": (str,), "quiet": (bool,),
    "engine": (str,),
}

#: Options the sweep sets itself in every script: the run directory and what to do with an
#: earlier attempt's files.
RESERVED_TRAIN_OPTIONS = {
    "out": "the run directory is <output>/runs/<point name>",
    "resume": "scripts resume from the last checkpoint by themselves",
    "overwrite": "scripts start over by themselves when an earlier attempt left no checkpoint",
}

#: ``ranks`` is not a train option: it is the number of processes the launcher starts.
RANKS_KEY = "ranks"


@dataclass(frozen=True)
class TrainOption:
    """One ``hvdcomp train`` option as a spec sees it."""

    name: str                       # long option without dashes: "batch-size"
    flag: str                       # what goes on the command line: "--batch-size"
    is_flag: bool = False           # boolean switch: rendered as --x / --no-x, never with a value
    false_flag: Optional[str] = None  # "--no-x" when the switch has one
    multiple: bool = False
    convert: Callable[[Any], Any] = lambda value: value  # raises ValueError on a bad value


@dataclass(frozen=True)
class TrainOptions:
    """The option table specs are validated against, and where it came from."""

    options: Dict[str, TrainOption]
    source: str  # "hvdcomp.cli.train" or "fallback list (...why...)"

    def lookup(self, key: str) -> Optional[TrainOption]:
        return self.options.get(key.replace("_", "-"))


def _convert_with_click(param) -> Callable[[Any], Any]:
    import click

    def convert(value):
        try:
            return param.type.convert(value, param, None)
        except click.BadParameter as exc:
            raise ValueError(exc.format_message()) from None
    return convert


def _convert_python(kinds: Tuple[type, ...]) -> Callable[[Any], Any]:
    def convert(value):
        # TOML already typed the value; only check it (an int is a fine float).
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ValueError(f"expected {names}, got {type(value).__name__} {value!r}")
        return value
    return convert


def train_options() -> TrainOptions:
    """Introspect ``hvdcomp.cli.train.command``; fall back to the documented option list."""
    try:
        from hvdcomp.cli.train import command
    except Exception as exc:  # noqa: BLE001 - any import failure means: validate against the list
        reason = f"hvdcomp.cli.train not importable: {type(exc).__name__}: {exc}"
        options = {name: TrainOption(name, f"--{name}", is_flag=kinds == (bool,),
                                     multiple=kinds == (list,),
                                     convert=_convert_python((str,) if kinds == (list,) else kinds))
                   for name, kinds in FALLBACK_TRAIN_OPTIONS.items()}
        return TrainOptions(options, f"fallback list ({reason})")
    import click

    options: Dict[str, TrainOption] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden:  # hidden: test-only options
            continue
        longs = [opt for opt in param.opts if opt.startswith("--")]
        if not longs:
            continue
        false_flag = next((o for o in param.secondary_opts if o.startswith("--")), None)
        option = TrainOption(longs[0][2:], longs[0], is_flag=bool(param.is_flag),
                             false_flag=false_flag, multiple=bool(param.multiple),
                             convert=_convert_with_click(param))
        for opt in longs:
            options[opt[2:]] = option
    return TrainOptions(options, "hvdcomp.cli.train")
