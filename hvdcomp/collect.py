"""Comparison tables and figures from run directories (``hvdcomp collect``).

Reads the run directories of docs/design.md ("Run directories"): every folder under the given
roots that holds a ``config.json``. A run enters the table only when its ``summary.json`` says
``"status": "completed"``; runs still going or stopped early (no summary), and corrupt ones
(unparsable JSON, a damaged line inside ``metrics.jsonl``, missing summary fields) are listed as
skipped with the reason, never a crash.

Per run a row holds its method name (:func:`hvdcomp.labels.method_name`), the options that differ
between the runs, then:

- final and best test accuracy (``summary.json``; fractions, shown in percent);
- time to a target accuracy: ``wall_time`` of the first epoch record whose ``test_accuracy``
  reaches ``--target`` (LIEC-SGD paper, Table "time to accuracy");
- wall-clock seconds, bytes sent per rank up and down (cumulative, per rank);
- compression ratio against P-SGD: bytes the P-SGD run with otherwise the same settings sent
  (up + down) divided by this run's bytes; without such a run, against what dense 32-bit P-SGD
  sends, ``2 (N-1)/N × gradient bytes`` per step (a ring allreduce, as
  :func:`hvdcomp.train.results.psgd_bytes_per_step`), when the run recorded its model size;
- throughput (``samples_per_s``).

Also here: every metrics record as a row (:func:`curves`, ``--curves``). Formats and which
options become columns: :mod:`hvdcomp.collect_table`; figures (``--plot``): :mod:`hvdcomp.plots`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import UserError
from .labels import method_name

#: summary.json fields a completed run must have (docs/design.md).
SUMMARY_FIELDS = ("final_accuracy", "best_accuracy", "wall_time", "bytes_up", "bytes_down")

#: Config keys that say how a run was *compressed* (or are bookkeeping): a P-SGD baseline may
#: differ from a run in these and still be "the psgd run with otherwise the same settings".
#: Momentum is here because train resolves it per algorithm (0 for DGC/EF21-SGDM/MoNNA).
NOT_SETTINGS_FOR_BASELINE = {
    "algorithm", "up", "down", "compressor", "down_compressor", "period", "algorithm_options",
    "bucket_bytes", "momentum", "nesterov",
    "out", "resume", "quiet", "log_every", "checkpoint_every", "keep_checkpoints", "device",
    "data_dir", "launcher", "tensorboard",
}
#: Config keys never shown as option columns (they differ between runs without meaning a
#: different experiment).
NOT_OPTION_COLUMNS = {"out", "resume", "quiet", "log_every", "checkpoint_every",
                      "keep_checkpoints", "data_dir", "launcher", "tensorboard"}
#: Where a run may record its model size: dense fp32 gradient bytes, or parameter counts.
GRADIENT_BYTES_KEYS = ("gradient_bytes_per_step", "gradient_bytes")
PARAMETER_COUNT_KEYS = ("num_parameters", "parameters", "model_parameters", "n_parameters")

METRIC_COLUMNS = ("final_accuracy", "best_accuracy", "time_to_target", "epochs_to_target",
                  "wall_time", "bytes_up", "bytes_down", "compression_ratio", "ratio_up",
                  "ratio_down", "baseline", "samples_per_s")


class CollectError(UserError):
    """Bad arguments to collect (a missing folder, an unwritable --plot folder, no matplotlib)."""


class RunDirError(UserError, ValueError):
    """A run directory that cannot enter the table; ``kind`` is "partial" or "corrupt"."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclass
class Run:
    path: Path
    config: Dict[str, Any]
    summary: Dict[str, Any]
    epochs: List[Dict[str, Any]] = field(default_factory=list)  # "epoch" records, in order
    steps: List[Dict[str, Any]] = field(default_factory=list)   # "step" records, in order

    @property
    def algorithm(self) -> str:
        return str(self.config.get("algorithm", ""))

    @property
    def world_size(self) -> Optional[int]:
        for source in (self.config, self.summary):
            value = source.get("world_size")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None


@dataclass
class Skipped:
    path: Path
    kind: str     # "partial" (running or stopped early), "corrupt" or "unreadable" (a folder)
    reason: str


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def find_run_dirs(roots: Iterable["str | Path"],
                  unreadable: Optional[List[Tuple[Path, str]]] = None) -> List[Path]:
    """Every folder under ``roots`` (the roots included) that holds a config.json, sorted.

    Folders that cannot be listed are appended to ``unreadable`` as (path, reason) instead of
    being passed over in silence (``os.walk`` drops them otherwise)."""
    found = set()

    def walk_error(exc: OSError) -> None:
        if unreadable is not None:
            unreadable.append((Path(exc.filename), f"folder unreadable: {exc.strerror}"))

    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise CollectError(f"{root}: no such directory")
        for folder, dirs, files in os.walk(root, onerror=walk_error):
            dirs[:] = [d for d in dirs if d != "checkpoints"]  # nothing to find in there
            # config.json as a folder (or a link to one) is a damaged run, not a missing one
            if "config.json" in files or "config.json" in dirs:
                found.add(Path(folder))
    return sorted(found)


def _read_bytes_of(path: Path, what: str) -> bytes:
    """The bytes of a regular file, or RunDirError("corrupt") saying why not. Checks the type
    first: opening a FIFO for reading would block forever."""
    try:
        if not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise RunDirError("corrupt", f"{what} is {kind}")
        return path.read_bytes()
    except OSError as exc:
        raise RunDirError("corrupt", f"{what} unreadable: {exc.strerror or exc}") from None


def _read_text(path: Path, what: str) -> str:
    data = _read_bytes_of(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunDirError("corrupt", f"{what} is not UTF-8 text (byte {exc.start} is "
                                     f"0x{data[exc.start]:02x}): a binary or damaged "
                                     "file") from None


def _read_json_object(path: Path, what: str) -> Dict[str, Any]:
    text = _read_text(path, what)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise RunDirError("corrupt", f"{what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunDirError("corrupt", f"{what} holds {type(data).__name__}, not an object")
    return data


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """Records of a metrics.jsonl. A damaged *last* line is what a killed writer leaves and is
    dropped; a damaged line before it (bad JSON or bytes that are not UTF-8) means the file is
    corrupt, and so does a metrics.jsonl that is not a readable regular file."""
    if not os.path.lexists(path):
        return []
    raw = _read_bytes_of(path, "metrics.jsonl").split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    records = []
    for number, line in enumerate(raw, start=1):
        try:
            text = line.decode("utf-8")
            if not text.strip():
                continue
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
            if number == len(raw):
                break
            raise RunDirError("corrupt",
                              f"metrics.jsonl line {number} is damaged ({exc})") from None
        records.append(record)
    return records


def read_run(path: "str | Path") -> Run:
    """One run directory; raises :class:`RunDirError` when it cannot enter the table."""
    path = Path(path)
    config = _read_json_object(path / "config.json", "config.json")
    records = read_metrics(path / "metrics.jsonl")
    epochs = [r for r in records if r.get("event") == "epoch"]
    steps = [r for r in records if r.get("event") == "step"]
    if not os.path.lexists(path / "summary.json"):
        last = f", last epoch {epochs[-1].get('epoch')}" if epochs else ""
        raise RunDirError("partial", f"no summary.json: running or stopped early "
                                     f"({len(records)} metric records{last})")
    summary = _read_json_object(path / "summary.json", "summary.json")
    if summary.get("status") != "completed":
        raise RunDirError("partial", f"summary.json status is {summary.get('status')!r}, "
                                     "not 'completed'")
    missing = [k for k in SUMMARY_FIELDS if not _is_number(summary.get(k))]
    if missing:
        raise RunDirError("corrupt", f"summary.json lacks numeric {', '.join(missing)}")
    return Run(path, config, summary, epochs, steps)


def load_runs(roots: Iterable["str | Path"]) -> Tuple[List[Run], List[Skipped]]:
    """The completed runs under ``roots`` and every folder left out, with the reason. Reading
    one run never aborts the others: a failure nobody foresaw is listed as corrupt with its
    exception type, like a damaged file."""
    runs, skipped = [], []
    unreadable: List[Tuple[Path, str]] = []
    for folder in find_run_dirs(roots, unreadable):
        try:
            runs.append(read_run(folder))
        except RunDirError as exc:
            skipped.append(Skipped(folder, exc.kind, str(exc)))
        except Exception as exc:  # noqa: BLE001 - see the docstring
            skipped.append(Skipped(folder, "corrupt",
                                   f"cannot be read ({type(exc).__name__}: {exc})"))
    skipped += [Skipped(folder, "unreadable", reason) for folder, reason in unreadable]
    return runs, sorted(skipped, key=lambda s: str(s.path))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# Comparison rows
# ----------------------------------------------------------------------------------------------

def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def normalise_key(key: str) -> str:
    return key.strip().replace("-", "_")


def option_columns(runs: Sequence[Run],
                   always: Sequence[str] = ("algorithm", "up", "down")) -> List[str]:
    """Config keys whose values differ between runs (plus ``always`` when present), in config
    order of the first run; bookkeeping keys are left out."""
    order: List[str] = []
    for run in runs:
        for key in run.config:
            if key not in order:
                order.append(key)
    order = [k for k in always if k in order] + [k for k in order if k not in always]
    columns = []
    for key in order:
        if key in NOT_OPTION_COLUMNS:
            continue
        values = {_canonical(run.config.get(key)) for run in runs}
        if len(values) > 1 or (key in always and any(key in r.config for r in runs)):
            columns.append(key)
    return columns


def _baseline_key(run: Run) -> str:
    return _canonical({k: v for k, v in run.config.items() if k not in NOT_SETTINGS_FOR_BASELINE})


def _dense_bytes_per_step(run: Run) -> Optional[float]:
    """P-SGD's bytes per step per rank (up + down) from the recorded model size, or None."""
    from hvdcomp.train.results import psgd_bytes_per_step
    gradient_bytes = None
    for source in (run.summary, run.config):
        for key in GRADIENT_BYTES_KEYS:
            if gradient_bytes is None and _is_number(source.get(key)):
                gradient_bytes = float(source[key])
        for key in PARAMETER_COUNT_KEYS:
            if gradient_bytes is None and _is_number(source.get(key)):
                gradient_bytes = 4.0 * float(source[key])  # 32-bit floats
    if gradient_bytes is None or not run.world_size or run.world_size < 2:
        return None
    return psgd_bytes_per_step(gradient_bytes, run.world_size)


def time_to_target(run: Run, target: float) -> Tuple[Optional[float], Optional[float]]:
    """(wall_time, epoch) of the first epoch record with test_accuracy >= target."""
    for record in run.epochs:
        accuracy = record.get("test_accuracy")
        if _is_number(accuracy) and accuracy >= target:
            return record.get("wall_time"), record.get("epoch")
    return None, None


def normalise_target(target: Optional[float]) -> Optional[float]:
    """Accuracies are fractions; a target above 1 is read as percent (90 -> 0.9)."""
    if target is None:
        return None
    if target < 0 or target > 100:
        raise ValueError(f"--target {target}: give an accuracy as a fraction (0.9) or percent (90)")
    return target / 100.0 if target > 1 else target


def compare(runs: Sequence[Run], target: Optional[float] = None,
            columns: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """One row per run: ``run`` (path), ``method`` (:func:`hvdcomp.labels.method_name`), the
    option columns, then :data:`METRIC_COLUMNS`."""
    columns = list(columns if columns is not None else option_columns(runs))
    psgd_by_settings: Dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        if run.algorithm == "psgd":
            psgd_by_settings.setdefault(_baseline_key(run), run)
    rows = []
    for run in runs:
        s = run.summary
        row: Dict[str, Any] = {"run": str(run.path), "method": method_name(run.config)}
        for key in columns:
            row[key] = run.config.get(key)
        row["final_accuracy"] = s["final_accuracy"]
        row["best_accuracy"] = s["best_accuracy"]
        if target is not None:
            row["time_to_target"], row["epochs_to_target"] = time_to_target(run, target)
        row["wall_time"] = s["wall_time"]
        row["bytes_up"], row["bytes_down"] = s["bytes_up"], s["bytes_down"]
        sent_up, sent_down = float(s["bytes_up"]), float(s["bytes_down"])
        baseline = psgd_by_settings.get(_baseline_key(run))
        ratio = ratio_up = ratio_down = None
        baseline_name = None
        if baseline is not None:
            base_up = float(baseline.summary["bytes_up"])
            base_down = float(baseline.summary["bytes_down"])
            baseline_name = "self" if baseline is run else f"psgd run {baseline.path}"
            ratio = _ratio(base_up + base_down, sent_up + sent_down)
            ratio_up, ratio_down = _ratio(base_up, sent_up), _ratio(base_down, sent_down)
        else:
            per_step = _dense_bytes_per_step(run)
            steps = s.get("steps")
            if per_step is not None and _is_number(steps):
                baseline_name = "dense fp32 from model size"
                ratio = _ratio(per_step * steps, sent_up + sent_down)
                ratio_up = _ratio(per_step * steps / 2, sent_up)
                ratio_down = _ratio(per_step * steps / 2, sent_down)
        row.update(compression_ratio=ratio, ratio_up=ratio_up, ratio_down=ratio_down,
                   baseline=baseline_name, samples_per_s=s.get("samples_per_s"))
        rows.append(row)
    return rows


#: Columns of ``--curves`` that come first, in this order; other record keys follow.
CURVE_COLUMNS = ("run", "method", "seed", "event", "step", "epoch", "wall_time", "samples", "loss",
                 "train_accuracy", "test_loss", "test_accuracy", "bytes_up", "bytes_down",
                 "time_compute", "time_compress", "time_comm", "lr")


def curves(runs: Sequence[Run]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Every metrics record of every run (``step`` and ``epoch`` events, in step order) as one
    row with the run and its method; and the columns, :data:`CURVE_COLUMNS` first."""
    rows, extra = [], []
    for run in runs:
        records = sorted(run.steps + run.epochs,
                         key=lambda r: (r.get("step", 0), r.get("event") == "epoch"))
        for record in records:
            rows.append({"run": str(run.path), "method": method_name(run.config),
                         "seed": run.config.get("seed"), **record})
            extra += [k for k in record if k not in CURVE_COLUMNS and k not in extra]
    present = {k for row in rows for k in row}
    return rows, [k for k in CURVE_COLUMNS if k in present] + extra


def _ratio(baseline: float, sent: float) -> Optional[float]:
    return baseline / sent if sent > 0 else None


# ----------------------------------------------------------------------------------------------
# Grouping and sorting (formats: hvdcomp.collect_table)
# ----------------------------------------------------------------------------------------------

def _sort_value(value: Any):
    # None last; numbers before strings; everything comparable.
    if value is None:
        return (2, 0, "")
    if _is_number(value):
        return (0, float(value), "")
    return (1, 0, _canonical(value) if not isinstance(value, str) else value)


def sort_rows(rows: List[Dict[str, Any]], keys: Sequence[str]) -> List[Dict[str, Any]]:
    """Stable sort by ``keys`` in order; ``-key`` sorts descending (None stays last)."""
    rows = list(rows)
    for key in reversed(list(keys)):
        descending = key.startswith("-")
        name = normalise_key(key.lstrip("-"))
        present = [r for r in rows if r.get(name) is not None]
        absent = [r for r in rows if r.get(name) is None]
        present.sort(key=lambda r: _sort_value(r.get(name)), reverse=descending)
        rows = present + absent
    return rows


def group_rows(rows: List[Dict[str, Any]],
               keys: Sequence[str]) -> List[Tuple[Dict[str, Any], List[Dict[str, Any]]]]:
    """[(group values, rows)], groups in order of their values."""
    keys = [normalise_key(k) for k in keys]
    groups: Dict[str, Tuple[Dict[str, Any], List[Dict[str, Any]]]] = {}
    for row in rows:
        values = {k: row.get(k) for k in keys}
        groups.setdefault(_canonical(values), (values, []))[1].append(row)
    return sorted(groups.values(), key=lambda g: [_sort_value(g[0][k]) for k in keys])


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CollectError("--plot needs matplotlib, which is not installed: "
                           "pip install 'hvdcomp[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def check_plot_dir(outdir: "str | Path") -> Path:
    """Before any work: matplotlib imports, and ``outdir`` exists (created) and takes a file.
    Raises CollectError naming the folder and the reason."""
    _pyplot()
    outdir = Path(outdir)
    probe = outdir / f".collect-probe-{os.getpid()}"
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CollectError(f"--plot {outdir}: cannot write figures there "
                           f"({exc.strerror or exc}); choose another folder") from None
    return outdir


def plot(runs: Sequence[Run], outdir: "str | Path", group_by: Sequence[str] = (),
         formats: Sequence[str] = ("png",)) -> List[Path]:
    """Write the figures of :mod:`hvdcomp.plots`, one set per group; returns the files."""
    from .collect_table import display as _display
    from .plots import figures
    plt = _pyplot()
    outdir = check_plot_dir(outdir)
    group_keys = [normalise_key(k) for k in group_by]
    written = []
    for values, members in _group_runs(runs, group_keys):
        suffix = "".join(f"_{k}-{_display(k, v)}" for k, v in values.items())
        suffix = "".join(ch if ch.isalnum() or ch in "._-=" else "-" for ch in suffix)
        title = ", ".join(f"{k} = {_display(k, v)}" for k, v in values.items())
        for stem, fig in figures(plt, members, title):
            try:
                for fmt in formats:
                    path = outdir / f"{stem}{suffix}.{fmt}"
                    fig.savefig(path, dpi=150)
                    written.append(path)
            except OSError as exc:  # a full disk, a folder removed meanwhile
                raise CollectError(f"--plot {outdir}: writing {path.name} failed "
                                   f"({exc.strerror or exc})") from None
            finally:
                plt.close(fig)
    return written


def _group_runs(runs: Sequence[Run], keys: Sequence[str]):
    groups: Dict[str, Tuple[Dict[str, Any], List[Run]]] = {}
    for run in runs:
        values = {k: run.config.get(k) for k in keys}
        groups.setdefault(_canonical(values), (values, []))[1].append(run)
    return sorted(groups.values(), key=lambda g: [_sort_value(g[0][k]) for k in keys])
