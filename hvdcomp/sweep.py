"""Sweep specs: TOML files in ``jobs/`` that describe a grid of ``hvdcomp train`` runs.

A spec has four tables (see docs/slurm.md for the full reference)::

    [sweep]      name, output (the sweep directory), description
    [train]      fixed ``hvdcomp train`` options for every point, plus ``ranks``
    [matrix]     lists of values; the sweep is their Cartesian product, with
                 ``exclude = [{...}]`` removing points and ``include = [{...}]`` adding points
    [cluster]    Slurm and launch settings; ``[cluster.env]`` holds exported variables

This module only reads, validates and expands specs; :mod:`hvdcomp.slurmjobs` turns points into
sbatch scripts. Every problem is a :class:`SpecError` that names the file, the line and the key,
because a typo in a 64-point sweep should fail before anything reaches the queue.

Train options are checked against the real ``hvdcomp train`` Click command when it imports (its
parameter types convert and check the values, so a misspelt algorithm name is caught here), and
against :data:`FALLBACK_TRAIN_OPTIONS` otherwise.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11 uses the backport (a dependency there)
    import tomli as tomllib


class SpecError(UserError, ValueError):
    """A sweep spec is malformed; the message names file, line and key, and the fix."""


# ----------------------------------------------------------------------------------------------
# Train options: the real Click command when it imports, else this list
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Locating keys in the TOML text (tomllib keeps no positions)
# ----------------------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _normalise_header(text: str) -> Tuple[str, ...]:
    return tuple(part.strip().strip('"').strip("'") for part in text.split("."))


def find_line(text: str, table: Sequence[str], key: Optional[str] = None) -> int:
    """1-based line of ``key`` inside ``[table]`` (or of the table header when ``key`` is None).

    Scans the text: headers set the current table; ``key =`` (bare or quoted) inside it is the hit;
    a dotted key ``table.key =`` written at the top level counts too. Returns the header's line, or
    1, when the key cannot be found (e.g. inside an inline table)."""
    table = tuple(table)
    current: Tuple[str, ...] = ()
    header_line = 1 if not table else 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header and "=" not in line.split("#", 1)[0].split("]")[0]:
            current = _normalise_header(header.group(1))
            if current == table and not header_line:
                header_line = lineno
            if key is not None and current[:len(table) + 1] == table + (key,):
                return lineno  # the key is itself a table: [cluster] or [cluster.env]
            continue
        if key is None:
            continue
        m = re.match(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""",
                     line)
        if not m:
            continue
        dotted = current + _normalise_header(m.group(1))
        if dotted == table + (key,):
            return lineno
    return header_line or 1


# ----------------------------------------------------------------------------------------------
# Cluster settings
# ----------------------------------------------------------------------------------------------

_TIME = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LAUNCHERS = ("srun", "mpirun")


@dataclass(frozen=True)
class ClusterSettings:
    """The ``[cluster]`` table: where and how each point's job runs."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "01:00:00"
    nodes: Optional[int] = None            # None: ceil(ranks / tasks-per-node)
    tasks_per_node: Optional[int] = None   # None: ceil(ranks / nodes)
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    gpu_bind: str = "local-rank"           # one GPU per rank; or any `srun --gpu-bind` value
    mem: Optional[str] = None
    cpus_per_node: Optional[int] = None    # for overcommit = "auto"; else asked of sinfo
    overcommit: Any = "auto"               # True, False or "auto"
    launcher: str = "srun"                 # "srun" (srun --mpi=<srun-mpi>) or "mpirun"
    srun_mpi: str = "pmix"
    launcher_args: Tuple[str, ...] = ()    # extra arguments to srun / mpirun
    modules: Tuple[str, ...] = ()          # `module load` each, in order
    setup: Tuple[str, ...] = ()            # shell lines run before the launch
    env: Tuple[Tuple[str, str], ...] = ()  # exported, sorted by name
    requeue: bool = True
    sbatch_args: Tuple[str, ...] = ()      # extra "#SBATCH" options, e.g. "--constraint=a100"
    hvdcomp: str = "hvdcomp"               # how to call hvdcomp inside the job
    workdir: Optional[str] = None          # directory the job runs in; None: where you render

    def layout(self, ranks: int) -> Tuple[int, int]:
        """(nodes, tasks per node) for ``ranks`` processes."""
        if self.nodes and self.tasks_per_node:
            return self.nodes, self.tasks_per_node
        if self.tasks_per_node:
            return math.ceil(ranks / self.tasks_per_node), self.tasks_per_node
        nodes = self.nodes or 1
        return nodes, math.ceil(ranks / nodes)


# key -> (attribute, check(value) -> converted value or raise ValueError with the expectation)
def _is(kind, what):
    def check(value):
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise ValueError(f"expected {what}, got {type(value).__name__} {value!r}")
        return value
    return check


def _positive_int(value):
    _is(int, "a positive integer")(value)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(value):
    _is(int, "an integer >= 0")(value)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {value}")
    return value


def _string_list(value):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _time(value):
    _is(str, 'a Slurm time such as "01:30:00" or "1-00:00:00"')(value)
    if not _TIME.match(value):
        raise ValueError(f'expected a Slurm time such as "01:30:00" or "1-00:00:00", got {value!r}')
    return value


def _launcher(value):
    if value not in LAUNCHERS:
        raise ValueError(f"expected one of {', '.join(map(repr, LAUNCHERS))}, got {value!r}")
    return value


def _overcommit(value):
    if value is True or value is False or value == "auto":
        return value
    raise ValueError(f'expected true, false or "auto", got {value!r}')


_CLUSTER_KEYS: Dict[str, Tuple[str, Callable[[Any], Any]]] = {
    "partition": ("partition", _is(str, "a string")),
    "account": ("account", _is(str, "a string")),
    "qos": ("qos", _is(str, "a string")),
    "time": ("time", _time),
    "nodes": ("nodes", _positive_int),
    "tasks-per-node": ("tasks_per_node", _positive_int),
    "cpus-per-task": ("cpus_per_task", _positive_int),
    "gpus-per-node": ("gpus_per_node", _non_negative_int),
    "gpu-bind": ("gpu_bind", _is(str, "a string")),
    "mem": ("mem", _is(str, 'a string such as "16G"')),
    "cpus-per-node": ("cpus_per_node", _positive_int),
    "overcommit": ("overcommit", _overcommit),
    "launcher": ("launcher", _launcher),
    "srun-mpi": ("srun_mpi", _is(str, 'a string such as "pmix"')),
    "launcher-args": ("launcher_args", _string_list),
    "modules": ("modules", _string_list),
    "setup": ("setup", _string_list),
    "env": ("env", None),  # a table, checked on its own
    "requeue": ("requeue", _is(bool, "true or false")),
    "sbatch-args": ("sbatch_args", _string_list),
    "hvdcomp": ("hvdcomp", _is(str, "a command such as \"hvdcomp\"")),
    "workdir": ("workdir", _is(str, "a directory")),
}

_SWEEP_KEYS = {"name", "output", "description"}
_TOP_TABLES = {"sweep", "train", "matrix", "cluster"}
_MATRIX_SPECIAL = {"exclude", "include"}


# ----------------------------------------------------------------------------------------------
# Specs and points
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPoint:
    """One run of the sweep: its deterministic name, rank count and train options."""

    name: str
    ranks: int
    options: Dict[str, Any]        # train option name ("batch-size") -> value, fixed + varied
    varied: Dict[str, Any]         # the matrix values that make this point (including ranks)


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    name: str
    output: str
    description: str
    train: Dict[str, Any]
    matrix_keys: Tuple[str, ...]
    points: Tuple[SweepPoint, ...]
    cluster: ClusterSettings
    train_options: TrainOptions = field(repr=False, compare=False, default=None)

    def point(self, name: str) -> SweepPoint:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(name)


class _Context:
    """File text and name, to turn a problem into ``file:line: message``."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def error(self, table: Sequence[str], key: Optional[str], message: str) -> SpecError:
        line = find_line(self.text, table, key)
        where = ".".join(list(table) + ([key] if key else [])) or "(top level)"
        return SpecError(f"{self.path}:{line}: {where}: {message}")


def _unknown_key_message(key: str, known: Iterable[str]) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r}; {hint}known keys: {', '.join(known)}"


def _value_name(value: Any) -> str:
    """A point-name fragment for one value: safe in file names and job names."""
    text = json.dumps(value) if not isinstance(value, str) else value
    text = {"true": "on", "false": "off"}.get(text, text)
    safe = re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"
    if safe != text:  # two values could sanitise alike: the hash keeps names distinct
        safe += "-" + hashlib.sha1(text.encode()).hexdigest()[:6]
    return safe


def point_name(varied: Mapping[str, Any], key_order: Sequence[str]) -> str:
    """``algorithm-liec_compressor-sign_ranks-2``: matrix keys in spec order, then any extra
    keys from ``include`` entries in sorted order."""
    keys = [k for k in key_order if k in varied] + sorted(k for k in varied if k not in key_order)
    return "_".join(f"{key}-{_value_name(varied[key])}" for key in keys) or "default"


def _check_train_value(ctx: _Context, table, key, value, options: TrainOptions,
                       locate: Optional[str] = None):
    """Check one train option (or ``ranks``) and return (canonical name, value).

    ``locate`` is the key whose line an error points at when it differs from ``key`` (the
    ``include``/``exclude`` line for keys inside their inline tables)."""
    def error(message: str) -> SpecError:
        return ctx.error(table, locate or key, f"{key}: {message}" if locate else message)

    if key == RANKS_KEY:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise error(f"ranks must be a positive integer, got {value!r}")
        return RANKS_KEY, value
    canonical = key.replace("_", "-")
    if canonical in RESERVED_TRAIN_OPTIONS:
        raise error(f"do not set {key!r} in a spec: {RESERVED_TRAIN_OPTIONS[canonical]}")
    option = options.lookup(key)
    if option is None:
        known = sorted(set(o.name for o in options.options.values()) - set(RESERVED_TRAIN_OPTIONS))
        raise error(_unknown_key_message(key, known + [RANKS_KEY])
                        + f" (train options from {options.source})")
    if isinstance(value, (dict, list)) and not (option.multiple and isinstance(value, list)):
        raise error(f"expected a single value, got {value!r}")
    if option.is_flag and not isinstance(value, bool):
        raise error(f"{option.flag} is a switch: write true or false, got {value!r}")
    try:
        if option.multiple and isinstance(value, list):
            converted = [option.convert(v) for v in value]
        else:
            converted = option.convert(value)
    except ValueError as exc:
        raise error(f"bad value {value!r} for hvdcomp train {option.flag}: {exc}") from None
    # Keep the TOML value (not click's conversion, which may turn paths into objects) so that
    # names and scripts show what the user wrote; the conversion only proved it is acceptable.
    del converted
    return option.name, value


def load_spec(path: "str | Path", options: Optional[TrainOptions] = None) -> SweepSpec:
    """Read, validate and expand a sweep spec. Raises :class:`SpecError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"at line (\d+)", str(exc))
        line = f":{where.group(1)}" if where else ""
        raise SpecError(f"{path}{line}: not valid TOML: {exc}") from None
    return parse_spec(data, path, text, options)


def parse_spec(data: Mapping[str, Any], path: Path, text: str,
               options: Optional[TrainOptions] = None) -> SweepSpec:
    ctx = _Context(Path(path), text)
    options = options or train_options()

    for key, value in data.items():
        if key not in _TOP_TABLES:
            raise ctx.error((), key, _unknown_key_message(key, _TOP_TABLES))
        if not isinstance(value, dict):
            raise ctx.error((), key, f"expected a table [{key}], got {type(value).__name__}")

    # [sweep]
    sweep = data.get("sweep", {})
    for key in sweep:
        if key not in _SWEEP_KEYS:
            raise ctx.error(("sweep",), key, _unknown_key_message(key, _SWEEP_KEYS))
    for key in _SWEEP_KEYS & set(sweep):
        if not isinstance(sweep[key], str):
            raise ctx.error(("sweep",), key, f"expected a string, got {sweep[key]!r}")
    if "name" not in sweep:
        raise ctx.error(("sweep",), None, 'missing key "name": add name = "my-sweep" under [sweep]')
    if not _NAME.match(sweep["name"]):
        raise ctx.error(("sweep",), "name", f"{sweep['name']!r} must be letters, digits, '.', '_' or '-'")
    name = sweep["name"]
    output = sweep.get("output", f"runs/{name}")

    # [train]
    train: Dict[str, Any] = {}
    for key, value in data.get("train", {}).items():
        canonical, value = _check_train_value(ctx, ("train",), key, value, options)
        train[canonical] = value

    # [matrix]
    matrix_table = data.get("matrix", {})
    axes: Dict[str, List[Any]] = {}
    for key, values in matrix_table.items():
        if key in _MATRIX_SPECIAL:
            continue
        if not isinstance(values, list) or not values:
            raise ctx.error(("matrix",), key, f"expected a non-empty list of values, got {values!r}")
        checked = []
        for value in values:
            canonical, value = _check_train_value(ctx, ("matrix",), key, value, options)
            checked.append(value)
        if len({json.dumps(v, sort_keys=True) for v in checked}) != len(checked):
            raise ctx.error(("matrix",), key, f"repeated values in {values!r}")
        if canonical in train:
            raise ctx.error(("matrix",), key, f"{key!r} is set in [train] too: keep it in one table")
        axes[canonical] = checked

    def check_entries(kind: str) -> List[Dict[str, Any]]:
        entries = matrix_table.get(kind, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ctx.error(("matrix",), kind, f"expected a list of inline tables like [{{algorithm = \"psgd\"}}], got {entries!r}")
        result = []
        for entry in entries:
            converted = {}
            for key, value in entry.items():
                if key != RANKS_KEY and options.lookup(key) is None:
                    raise ctx.error(("matrix",), kind, f"in {kind}: " + _unknown_key_message(
                        key, sorted(set(axes) | {RANKS_KEY})))
                canonical, value = _check_train_value(ctx, ("matrix",), key, value, options,
                                                      locate=kind)
                if kind == "exclude" and canonical not in axes:
                    raise ctx.error(("matrix",), kind, f"exclude names {key!r}, which is not a matrix key")
                converted[canonical] = value
            result.append(converted)
        return result

    excludes = check_entries("exclude")
    includes = check_entries("include")

    # [cluster]
    cluster_table = data.get("cluster", {})
    cluster_kwargs: Dict[str, Any] = {}
    for key, value in cluster_table.items():
        if key not in _CLUSTER_KEYS:
            raise ctx.error(("cluster",), key, _unknown_key_message(key, _CLUSTER_KEYS))
        attr, check = _CLUSTER_KEYS[key]
        if key == "env":
            if not isinstance(value, dict):
                raise ctx.error(("cluster",), key, "expected a table [cluster.env] of NAME = value")
            env = {}
            for var, val in value.items():
                if not _ENV_NAME.match(var):
                    raise ctx.error(("cluster", "env"), var, f"{var!r} is not a shell variable name")
                if isinstance(val, (dict, list)):
                    raise ctx.error(("cluster", "env"), var, f"expected a string or number, got {val!r}")
                env[var] = (str(val).lower() if isinstance(val, bool) else str(val))
            cluster_kwargs[attr] = tuple(sorted(env.items()))
            continue
        try:
            cluster_kwargs[attr] = check(value)
        except ValueError as exc:
            raise ctx.error(("cluster",), key, str(exc)) from None
    cluster = ClusterSettings(**cluster_kwargs)
    if cluster.launcher == "mpirun" and cluster.gpu_bind not in ("local-rank", "none"):
        raise ctx.error(("cluster",), "gpu-bind",
                        f'with launcher = "mpirun" gpu-bind must be "local-rank" or "none", got {cluster.gpu_bind!r}')

    # Expand: product of the axes, minus excludes, plus includes.
    keys = list(axes)
    varied_points: List[Dict[str, Any]] = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        varied = dict(zip(keys, combo))
        if any(all(varied.get(k) == v for k, v in ex.items()) for ex in excludes):
            continue
        varied_points.append(varied)
    for entry in includes:
        overlap = set(entry) & set(train)
        if overlap:
            raise ctx.error(("matrix",), "include", f"include sets {sorted(overlap)}, which [train] fixes")
        varied_points.append(dict(entry))
    if not keys and not includes:
        varied_points = [{}]

    points: List[SweepPoint] = []
    seen: Dict[str, Dict[str, Any]] = {}
    for varied in varied_points:
        merged = {**train, **varied}
        ranks = merged.pop(RANKS_KEY, 1)
        nodes, per_node = cluster.layout(ranks)
        if nodes * per_node < ranks:
            raise ctx.error(("cluster",), "nodes",
                            f"{nodes} nodes x {per_node} tasks per node cannot hold {ranks} ranks")
        pname = point_name(varied, keys)
        if pname in seen:
            if seen[pname] == varied:
                continue  # an include that repeats a product point
            raise ctx.error(("matrix",), None, f"two points share the name {pname!r}")
        seen[pname] = varied
        points.append(SweepPoint(pname, ranks, merged, varied))
    if not points:
        raise ctx.error(("matrix",), "exclude", "every point is excluded: the sweep is empty")

    return SweepSpec(path=Path(path), name=name, output=output,
                     description=sweep.get("description", ""), train=train,
                     matrix_keys=tuple(keys), points=tuple(points), cluster=cluster,
                     train_options=options)


def train_arguments(point: SweepPoint, options: TrainOptions) -> List[str]:
    """The ``hvdcomp train`` arguments for a point (without --out / --resume), in a fixed order."""
    args: List[str] = []
    for key in sorted(point.options):
        value = point.options[key]
        option = options.lookup(key)
        flag = option.flag if option else f"--{key}"
        if option is not None and option.is_flag:
            if value:
                args.append(flag)
            elif option.false_flag:
                args.append(option.false_flag)
            continue
        values = value if isinstance(value, list) else [value]
        for item in values:
            text = json.dumps(item) if isinstance(item, bool) else str(item)
            args += [flag, text]
    return args
