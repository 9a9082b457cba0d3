"""Comparison tables and figures from run directories (``hvdcomp collect``).

Reads the run directories of docs/design.md ("Run directories") with :mod:`hvdcomp.run_dirs`
(re-exported here): a run enters the table only when its ``summary.json`` says ``"status":
"completed"``; the others are listed as skipped with the reason, never a crash.

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
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .labels import method_name
from .run_dirs import (SUMMARY_FIELDS, CollectError, Run, RunDirError, Skipped,  # noqa: F401
                       find_run_dirs, is_number, load_runs, read_metrics, read_run)

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
            if gradient_bytes is None and is_number(source.get(key)):
                gradient_bytes = float(source[key])
        for key in PARAMETER_COUNT_KEYS:
            if gradient_bytes is None and is_number(source.get(key)):
                gradient_bytes = 4.0 * float(source[key])  # 32-bit floats
    if gradient_bytes is None or not run.world_size or run.world_size < 2:
        return None
    return psgd_bytes_per_step(gradient_bytes, run.world_size)


def time_to_target(run: Run, target: float) -> Tuple[Optional[float], Optional[float]]:
    """(wall_time, epoch) of the first epoch record with test_accuracy >= target."""
    for record in run.epochs:
        accuracy = record.get("test_accuracy")
        if is_number(accuracy) and accuracy >= target:
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
            if per_step is not None and is_number(steps):
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
    if is_number(value):
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
