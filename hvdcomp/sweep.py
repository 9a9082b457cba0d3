"""Sweep specs: TOML files in ``jobs/`` that describe a grid of ``hvdcomp train`` runs.

A spec has four tables (see docs/slurm.md for the full reference)::

    [sweep]      name, output (the sweep directory), description
    [train]      fixed ``hvdcomp train`` options for every point, plus ``ranks``
    [matrix]     lists of values; the sweep is their Cartesian product, with
                 ``exclude = [{...}]`` removing points and ``include = [{...}]`` adding points
    [cluster]    Slurm and launch settings; ``[cluster.env]`` holds exported variables

This module only reads, validates and expands specs; :mod:`hvdcomp.slurm_render` turns points into
sbatch scripts. Every problem is a :class:`SpecError` that names the file, the line and the key
(:mod:`hvdcomp.sweep_problems` locates them), because a typo in a 64-point sweep should fail
before anything reaches the queue.

Train options are checked against the real ``hvdcomp train`` Click command when it imports
(:mod:`hvdcomp.sweep_options`), and their values the way train will check them in the job
(:mod:`hvdcomp.sweep_check`); ``[cluster]`` keys are :mod:`hvdcomp.sweep_cluster`'s. Every problem
found is reported at once, one ``file:line: key: problem`` line each.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .sweep_cluster import (_CLUSTER_KEYS, _ENV_NAME, _NAME, LAUNCHERS,  # noqa: F401
                            ClusterSettings, time_seconds)
from .sweep_problems import SpecContext, SpecError, unknown_key_message
from .sweep_options import (FALLBACK_TRAIN_OPTIONS, RANKS_KEY, RESERVED_TRAIN_OPTIONS,  # noqa: F401
                            TrainOption, TrainOptions, train_options)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11 uses the backport (a dependency there)
    import tomli as tomllib


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


def _check_train_value(ctx: SpecContext, table, key, value, options: TrainOptions,
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
        raise error(unknown_key_message(key, known + [RANKS_KEY])
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


def load_spec(path: "str | Path", options: Optional[TrainOptions] = None,
              validator: "Any | None" = None, workdir: "str | Path | None" = None) -> SweepSpec:
    """Read, validate and expand a sweep spec. Raises :class:`SpecError` listing every problem.

    ``validator``: a :class:`hvdcomp.sweep_check.TrainValidator` (default: one for this spec's
    ``data-local`` and job directory, ``workdir`` or the current one), or False to check the
    option types only."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError(f"{path}:{line}: not a sweep spec: byte {exc.start} "
                        f"(0x{raw[exc.start]:02x}) is not UTF-8 text; "
                        "a spec is a TOML text file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"at line (\d+)", str(exc))
        line = f":{where.group(1)}" if where else ""
        raise SpecError(f"{path}{line}: not valid TOML: {exc}") from None
    return parse_spec(data, path, text, options, validator=validator, workdir=workdir)


def parse_spec(data: Mapping[str, Any], path: Path, text: str,
               options: Optional[TrainOptions] = None, validator: "Any | None" = None,
               workdir: "str | Path | None" = None) -> SweepSpec:
    """Check every table, expand the points, then check the values the way train will
    (:mod:`hvdcomp.sweep_check`); every problem found is reported at once."""
    ctx = SpecContext(Path(path), text)
    options = options or train_options()

    for key, value in data.items():
        if key not in _TOP_TABLES:
            ctx.report((), key, unknown_key_message(key, _TOP_TABLES))
        elif not isinstance(value, dict):
            ctx.report((), key, f"expected a table [{key}], got {type(value).__name__}")
    tables = {key: value for key, value in data.items()
              if key in _TOP_TABLES and isinstance(value, dict)}
    name, output, description = _parse_sweep_table(ctx, tables.get("sweep", {}))
    sites: List[_ValueSite] = []
    train = _parse_train_table(ctx, tables.get("train", {}), options, sites)
    axes, excludes, includes = _parse_matrix(ctx, tables.get("matrix", {}), options, train, sites)
    cluster = _parse_cluster(ctx, tables.get("cluster", {}))
    keys = list(axes)
    # points only from a sound structure; each value is checked on its own regardless
    points, origins = ([], []) if ctx.problems else _expand(ctx, train, axes, excludes,
                                                            includes, cluster)
    if validator is None:
        from .sweep_check import TrainValidator
        validator = TrainValidator(cluster.data_local,
                                   Path(cluster.workdir or workdir or Path.cwd()).resolve())
    if validator:
        from .sweep_check import check_values
        check_values(ctx, validator, sites, points, origins, options, keys)
    ctx.raise_problems()
    return SweepSpec(path=Path(path), name=name, output=output, description=description,
                     train=train, matrix_keys=tuple(keys), points=tuple(points), cluster=cluster,
                     train_options=options)


@dataclass(frozen=True)
class _ValueSite:
    """Where one train value was written: its table, the key whose line errors point at, and
    the ``key: `` prefix for keys inside an include entry."""
    table: Tuple[str, ...]
    locate: str
    key: str
    canonical: str
    value: Any
    prefix: str = ""


def _parse_sweep_table(ctx: SpecContext, sweep: Mapping[str, Any]) -> Tuple[str, str, str]:
    for key in sweep:
        if key not in _SWEEP_KEYS:
            ctx.report(("sweep",), key, unknown_key_message(key, _SWEEP_KEYS))
    for key in _SWEEP_KEYS & set(sweep):
        if not isinstance(sweep[key], str):
            ctx.report(("sweep",), key, f"expected a string, got {sweep[key]!r}")
    name = sweep.get("name")
    if name is None:
        ctx.report(("sweep",), None, 'missing key "name": add name = "my-sweep" under [sweep]')
    elif isinstance(name, str) and not _NAME.match(name):
        ctx.report(("sweep",), "name", f"{name!r} must be letters, digits, '.', '_' or '-'")
    name = name if isinstance(name, str) else ""
    output = sweep.get("output", f"runs/{name}")
    return name, output if isinstance(output, str) else "", str(sweep.get("description", ""))


def _parse_train_table(ctx: SpecContext, table: Mapping[str, Any], options: TrainOptions,
                       sites: List[_ValueSite]) -> Dict[str, Any]:
    train: Dict[str, Any] = {}
    for key, value in table.items():
        checked = ctx.attempt(_check_train_value, ctx, ("train",), key, value, options)
        if checked is not None:
            train[checked[0]] = checked[1]
            sites.append(_ValueSite(("train",), key, key, checked[0], checked[1]))
    return train


def _parse_matrix(ctx: SpecContext, table: Mapping[str, Any], options: TrainOptions,
                  train: Mapping[str, Any], sites: List[_ValueSite]):
    """(axes, excludes, includes) of the [matrix] table."""
    axes: Dict[str, List[Any]] = {}
    for key, values in table.items():
        if key in _MATRIX_SPECIAL:
            continue
        if not isinstance(values, list) or not values:
            ctx.report(("matrix",), key, f"expected a non-empty list of values, got {values!r}")
            continue
        checked = [ctx.attempt(_check_train_value, ctx, ("matrix",), key, v, options)
                   for v in values]
        if any(c is None for c in checked):
            continue
        canonical = checked[0][0]
        values = [c[1] for c in checked]
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            ctx.report(("matrix",), key, f"repeated values in {values!r}")
        elif canonical in train:
            ctx.report(("matrix",), key, f"{key!r} is set in [train] too: keep it in one table")
        else:
            axes[canonical] = values
            sites += [_ValueSite(("matrix",), key, key, canonical, v) for v in values]
    excludes = _matrix_entries(ctx, table, "exclude", options, axes, sites)
    includes = _matrix_entries(ctx, table, "include", options, axes, sites)
    for entry in includes:
        overlap = set(entry) & set(train)
        if overlap:
            ctx.report(("matrix",), "include",
                       f"include sets {sorted(overlap)}, which [train] fixes")
    return axes, excludes, includes


def _matrix_entries(ctx: SpecContext, table: Mapping[str, Any], kind: str, options: TrainOptions,
                    axes: Mapping[str, Any], sites: List[_ValueSite]) -> List[Dict[str, Any]]:
    entries = table.get(kind, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        ctx.report(("matrix",), kind, f"expected a list of inline tables like "
                                      f"[{{algorithm = \"psgd\"}}], got {entries!r}")
        return []
    result = []
    for entry in entries:
        converted = {}
        for key, value in entry.items():
            if key != RANKS_KEY and options.lookup(key) is None:
                ctx.report(("matrix",), kind, f"in {kind}: " + unknown_key_message(
                    key, sorted(set(axes) | {RANKS_KEY})))
                continue
            checked = ctx.attempt(_check_train_value, ctx, ("matrix",), key, value, options,
                                  locate=kind)
            if checked is None:
                continue
            if kind == "exclude" and checked[0] not in axes:
                ctx.report(("matrix",), kind, f"exclude names {key!r}, which is not a matrix key")
                continue
            converted[checked[0]] = checked[1]
            if kind == "include":
                sites.append(_ValueSite(("matrix",), kind, key, checked[0], checked[1], f"{key}: "))
        result.append(converted)
    return result


def _parse_cluster(ctx: SpecContext, table: Mapping[str, Any]) -> ClusterSettings:
    kwargs: Dict[str, Any] = {}
    for key, value in table.items():
        if key not in _CLUSTER_KEYS:
            ctx.report(("cluster",), key, unknown_key_message(key, _CLUSTER_KEYS))
            continue
        attr, check = _CLUSTER_KEYS[key]
        if key == "env":
            env = _parse_env(ctx, value)
            if env is not None:
                kwargs[attr] = env
            continue
        try:
            kwargs[attr] = check(value)
        except ValueError as exc:
            ctx.report(("cluster",), key, str(exc))
    cluster = ClusterSettings(**kwargs)
    if cluster.requeue and cluster.requeue_warning >= time_seconds(cluster.time):
        ctx.report(("cluster",), "requeue-warning" if "requeue-warning" in table else "time",
                   f"requeue-warning = {cluster.requeue_warning} s is not shorter than time = "
                   f"{cluster.time!r}: each start would requeue itself at once; lower "
                   "requeue-warning, raise time, or set requeue = false")
    if cluster.launcher == "mpirun" and cluster.gpu_bind not in ("local-rank", "none"):
        ctx.report(("cluster",), "gpu-bind", f'with launcher = "mpirun" gpu-bind must be '
                                             f'"local-rank" or "none", got {cluster.gpu_bind!r}')
    return cluster


def _parse_env(ctx: SpecContext, value: Any) -> Optional[Tuple[Tuple[str, str], ...]]:
    if not isinstance(value, dict):
        ctx.report(("cluster",), "env", "expected a table [cluster.env] of NAME = value")
        return None
    env = {}
    for var, val in value.items():
        if not _ENV_NAME.match(var):
            ctx.report(("cluster", "env"), var, f"{var!r} is not a shell variable name")
        elif isinstance(val, (dict, list)):
            ctx.report(("cluster", "env"), var, f"expected a string or number, got {val!r}")
        else:
            env[var] = (str(val).lower() if isinstance(val, bool) else str(val))
    return tuple(sorted(env.items()))


def _expand(ctx: SpecContext, train, axes, excludes, includes, cluster: ClusterSettings):
    """The points: product of the axes, minus excludes, plus includes; and where each came
    from (None: the product; i: include entry i)."""
    keys = list(axes)
    varied_points: List[Tuple[Dict[str, Any], Optional[int]]] = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        varied = dict(zip(keys, combo))
        if not any(all(varied.get(k) == v for k, v in ex.items()) for ex in excludes):
            varied_points.append((varied, None))
    varied_points += [(dict(entry), i) for i, entry in enumerate(includes)]
    if not keys and not includes:
        varied_points = [({}, None)]
    points: List[SweepPoint] = []
    origins: List[Optional[int]] = []
    seen: Dict[str, Dict[str, Any]] = {}
    for varied, origin in varied_points:
        merged = {**train, **varied}
        ranks = merged.pop(RANKS_KEY, 1)
        nodes, per_node = cluster.layout(ranks)
        if nodes * per_node < ranks:
            ctx.report(("cluster",), "nodes",
                       f"{nodes} nodes x {per_node} tasks per node cannot hold {ranks} ranks")
            continue
        pname = point_name(varied, keys)
        if pname in seen:
            if seen[pname] != varied:
                ctx.report(("matrix",), None, f"two points share the name {pname!r}")
            continue  # an include that repeats a product point
        seen[pname] = varied
        points.append(SweepPoint(pname, ranks, merged, varied))
        origins.append(origin)
    if not points and not ctx.problems:
        ctx.report(("matrix",), "exclude", "every point is excluded: the sweep is empty")
    return points, origins


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
