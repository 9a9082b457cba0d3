"""The figures of ``hvdcomp collect --plot``, drawn as the papers draw theirs.

Per group of runs (``--group-by``), four figures:

- ``accuracy``: test accuracy against epochs, wall-clock time and bits sent per rank (log
  scale), side by side (LIEC-SGD's Fig. 2);
- ``loss-vs-bits``: ‖∇f‖² against bits sent where the runs recorded it (EF21's figures), the
  training loss otherwise, both axes log scale;
- ``step-time``: where the time of a step goes — compute, compress, wire and wait (the
  optimizer's collective waits), and the rest (data, evaluation) — as stacked bars;
- ``bytes``: bytes per step and rank in each direction, as the counters measured them.

A *series* is the runs that differ only in their seed: its line is the mean over seeds with a
band of ± one standard deviation, its bars the mean. Each series is named by
:func:`hvdcomp.labels.method_name` (``LIEC-SGD (sign ↑↓)``, ``DGC 0.1 %``), plus the settings
that tell apart series of one method; the legend sits below the axes, inside the figure.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .labels import method_name

#: Config keys that do not make another series: bookkeeping and the seed (averaged over).
NOT_SERIES_KEYS = {"seed", "out", "resume", "quiet", "log_every", "checkpoint_every",
                   "keep_checkpoints", "data_dir", "launcher", "device", "tensorboard"}
#: Keys already said by the method's name.
IN_METHOD_NAME = {"algorithm", "up", "down", "compressor", "down_compressor"}
#: Metric names a run may use for the squared gradient norm (EF21's y axis).
GRAD_NORM_KEYS = ("grad_norm_sq", "gradient_norm_sq", "grad_norm2")
FORMATS = ("png", "svg", "pdf")
#: Step-time components: (summary key or None for the rest, label).
TIME_PARTS = (("time_compute", "compute"), ("time_compress", "compress"),
              ("time_comm", "wire and wait"), (None, "other (data, evaluation)"))


@dataclass
class Series:
    label: str
    runs: list   # hvdcomp.collect.Run, all with the same settings but the seed


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _settings(run) -> Dict[str, Any]:
    return {k: v for k, v in run.config.items() if k not in NOT_SERIES_KEYS}


def series_of(runs: Sequence) -> List[Series]:
    """Runs grouped by everything but the seed, named; in the order of their names."""
    grouped: Dict[str, list] = {}
    for run in runs:
        grouped.setdefault(json.dumps(_settings(run), sort_keys=True, default=str), []).append(run)
    members = list(grouped.values())
    names = [method_name(group[0].config) for group in members]
    labels = []
    for name, group in zip(names, members):
        # series of one method that differ in other settings: say in which
        alike = [g for n, g in zip(names, members) if n == name]
        keys = sorted({k for g in alike for k in _settings(g[0])} - IN_METHOD_NAME)
        differing = [k for k in keys if len({json.dumps(_settings(g[0]).get(k), default=str)
                                             for g in alike}) > 1]
        extra = ", ".join(f"{k} {_short(group[0].config.get(k))}" for k in differing)
        seeds = f", {len(group)} seeds" if len(group) > 1 else ""
        labels.append(f"{name}{', ' + extra if extra else ''}{seeds}")
    return sorted((Series(label, group) for label, group in zip(labels, members)),
                  key=lambda s: s.label)


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bits(record: Dict[str, Any]) -> Optional[float]:
    """Bits sent so far (up + down); None for none (one rank): a log axis has no zero."""
    up, down = record.get("bytes_up"), record.get("bytes_down")
    if not (_is_number(up) and _is_number(down)) or up + down <= 0:
        return None
    return 8.0 * (up + down)


def _curve(records: Sequence[Dict[str, Any]], x_of, y_of) -> List[Tuple[float, float]]:
    points = []
    for record in records:
        x, y = x_of(record), y_of(record)
        if _is_number(x) and _is_number(y):
            points.append((float(x), float(y)))
    return points


def _mean_band(curves: List[List[Tuple[float, float]]]):
    """Mean x, mean y and y's standard deviation over seeds, point by point (records of runs
    with the same settings line up by position); None when no run has a point."""
    import numpy as np
    curves = [c for c in curves if c]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    data = np.array([c[:length] for c in curves])          # seeds x points x 2
    return data[:, :, 0].mean(0), data[:, :, 1].mean(0), data[:, :, 1].std(0)


def _draw(ax, series: Series, color, records_of, x_of, y_of) -> bool:
    band = _mean_band([_curve(records_of(run), x_of, y_of) for run in series.runs])
    if band is None:
        return False
    x, y, spread = band
    ax.plot(x, y, color=color, marker="o" if len(x) <= 30 else None, markersize=3,
            label=series.label)
    if len(series.runs) > 1:
        ax.fill_between(x, y - spread, y + spread, color=color, alpha=0.2, linewidth=0)
    return True


def _legend_below(fig, axes) -> None:
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", frameon=False,
                   ncol=min(len(labels), 3), fontsize="small")


def _colors(series: Sequence[Series]):
    import matplotlib
    cycle = matplotlib.colormaps["tab10"]
    return {s.label: cycle(i % 10) for i, s in enumerate(series)}


def _accuracy_percent(record: Dict[str, Any]) -> Optional[float]:
    accuracy = record.get("test_accuracy")
    return 100 * accuracy if _is_number(accuracy) else None


def accuracy_figure(plt, series: Sequence[Series], title: str):
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), layout="constrained")
    colors = _colors(series)
    panels = ((lambda r: r.get("epoch"), "epoch", False),
              (lambda r: r.get("wall_time"), "wall-clock time (s)", False),
              (_bits, "bits sent per rank, up + down", True))
    for ax, (x_of, x_label, log) in zip(axes, panels):
        for s in series:
            _draw(ax, s, colors[s.label], lambda run: run.epochs, x_of, _accuracy_percent)
        ax.set_xlabel(x_label)
        if log:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    if title:
        fig.suptitle(title)
    _legend_below(fig, axes)
    return fig


def loss_figure(plt, series: Sequence[Series], title: str):
    """‖∇f‖² against bits where every run has it, else the training loss (step records)."""
    key = next((k for k in GRAD_NORM_KEYS
                if all(any(k in r for r in run.steps) for s in series for run in s.runs)), None)
    y_label = "‖∇f(x)‖²" if key else "training loss"
    key = key or "loss"
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    colors = _colors(series)
    for s in series:
        _draw(ax, s, colors[s.label], lambda run: run.steps, _bits, lambda r: r.get(key))
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda value, _: f"{value:g}")   # 0.4, not 4×10⁻¹
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("bits sent per rank, up + down")
    ax.set_ylabel(y_label)
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title)
    _legend_below(fig, [ax])
    return fig


def _per_step(run, key: Optional[str]) -> Optional[float]:
    s = run.summary
    steps = s.get("steps")
    if not _is_number(steps) or steps <= 0:
        return None
    if key is None:   # the rest of the wall time
        parts = [s.get(k) for k, _ in TIME_PARTS if k]
        if not all(_is_number(p) for p in parts):
            return None
        return max(0.0, s["wall_time"] - sum(parts)) / steps
    return s[key] / steps if _is_number(s.get(key)) else None


def _mean(values: Sequence[Optional[float]]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else 0.0


def step_time_figure(plt, series: Sequence[Series], title: str):
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(series)), layout="constrained")
    names = [s.label for s in series]
    left = [0.0] * len(series)
    for (key, label), color in zip(TIME_PARTS, ("#4c72b0", "#dd8452", "#c44e52", "#bbbbbb")):
        widths = [1000 * _mean([_per_step(run, key) for run in s.runs]) for s in series]
        ax.barh(names, widths, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()   # the first series on top, as in the legend of the other figures
    ax.set_xlabel("time per step (ms), mean over seeds")
    ax.grid(True, axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    _legend_below(fig, [ax])
    return fig


def bytes_figure(plt, series: Sequence[Series], title: str):
    from .train.results import human_bytes
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * len(series)), layout="constrained")
    height = 0.38
    largest = 1.0
    directions = ((-height / 2, "bytes_up", "up (worker → server)", "#4c72b0"),
                  (height / 2, "bytes_down", "down (server → worker)", "#55a868"))
    for offset, key, label, color in directions:
        values = [_mean([run.summary[key] / run.summary["steps"] for run in s.runs
                         if _is_number(run.summary.get("steps")) and run.summary["steps"] > 0])
                  for s in series]
        positions = [i + offset for i in range(len(series))]
        ax.barh(positions, values, height=height, color=color, label=label)
        for y, value in zip(positions, values):
            # a run on one rank sends nothing: said at the axis, where a log scale has no zero
            where = (value, y) if value > 0 else (0.0, y)
            ax.annotate(human_bytes(value), where, xytext=(3, 0), textcoords="offset points",
                        xycoords="data" if value > 0 else ax.get_yaxis_transform(),
                        va="center", fontsize="x-small")
        largest = max([largest, *values])
    ax.set_yticks(range(len(series)), [s.label for s in series])
    ax.invert_yaxis()
    if largest > 1.0:
        ax.set_xscale("log")
    ax.set_xlim(right=largest * 6)   # room for the value at the end of the longest bar
    ax.set_xlabel("bytes per step and rank (log scale)")
    ax.grid(True, axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    _legend_below(fig, [ax])
    return fig


FIGURES = (("accuracy", accuracy_figure), ("loss-vs-bits", loss_figure),
           ("step-time", step_time_figure), ("bytes", bytes_figure))


def figures(plt, runs: Sequence, title: str = "") -> List[Tuple[str, Any]]:
    """``[(file stem, matplotlib Figure)]`` for one group of runs; the caller closes them."""
    series = series_of(runs)
    return [(stem, draw(plt, series, title)) for stem, draw in FIGURES]
