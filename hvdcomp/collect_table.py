"""The formats of ``hvdcomp collect``: a table people read, and CSV / JSON that tools read.

The readable formats (``table``, ``markdown``) name each run by its method
(:func:`hvdcomp.labels.method_name`) and show as columns only the settings that differ between
runs of one method (the seed of a sweep, a learning rate). Settings equal in every run are one
line above the table, and settings that differ only from method to method (each method's own
momentum, LIEC-SGD's period) one line per method. CSV and JSON keep every column, under the
row keys.

Headers and sort keys are the same words: ``--sort-by`` takes a header with ``_`` for its
spaces (``final_acc`` for "final acc") as well as the row key (``final_accuracy``).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .collect import NOT_OPTION_COLUMNS, _canonical
from .run_dirs import Run, Skipped, is_number
from .plots import IN_METHOD_NAME

#: Metric columns of the readable formats (the machine formats keep every column).
DISPLAY_METRICS = ("final_accuracy", "best_accuracy", "time_to_target", "wall_time", "bytes_up",
                   "bytes_down", "compression_ratio", "samples_per_s")
HEADERS = {"final_accuracy": "final acc", "best_accuracy": "best acc",
           "time_to_target": "time to target", "epochs_to_target": "epochs to target",
           "wall_time": "wall time", "bytes_up": "bytes up", "bytes_down": "bytes down",
           "compression_ratio": "vs psgd", "ratio_up": "vs psgd up", "ratio_down": "vs psgd down",
           "samples_per_s": "samples/s"}
NOTE = ("bytes up/down: sent per rank over the whole run; vs psgd: how many times fewer bytes "
        "than P-SGD")


def header(column: str) -> str:
    return HEADERS.get(column, column)


def key_spelling(text: str) -> str:
    """A header or key as typed on the command line: ``"final acc"`` -> ``final_acc``."""
    return re.sub(r"[\s/-]+", "_", text.strip().lower()).strip("_")


def resolve_column(name: str, known: Sequence[str]) -> Optional[str]:
    """The row key that ``name`` means, as a key or as its header; None when neither."""
    spelled = key_spelling(name)
    for key in known:
        if spelled in (key_spelling(key), key_spelling(header(key))):
            return key
    return None


def column_names(known: Sequence[str]) -> List[str]:
    """What --sort-by accepts, as headers spelled for the command line."""
    return sorted({key_spelling(header(k)) for k in known})


@dataclass
class Layout:
    """Which settings are columns, and which are said once above the table."""
    columns: List[str]                                   # option keys shown per row
    same: Dict[str, Any] = field(default_factory=dict)   # equal in every run
    by_method: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # method -> its settings


def layout(runs: Sequence[Run], keep: Sequence[str] = ()) -> Layout:
    """Split the runs' settings: equal everywhere, fixed per method, or varying (columns).
    ``keep`` (group and sort keys) are columns whatever they hold."""
    from .labels import method_name
    keys: List[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys]
    methods = [method_name(run.config) for run in runs]
    result = Layout(columns=[k for k in keep if k not in IN_METHOD_NAME])
    for key in keys:
        if key in NOT_OPTION_COLUMNS or key in IN_METHOD_NAME or key in keep:
            continue
        values = [_canonical(run.config.get(key)) for run in runs]
        if len(set(values)) == 1:
            result.same[key] = runs[0].config.get(key)
            continue
        per_method: Dict[str, set] = {}
        for method, value in zip(methods, values):
            per_method.setdefault(method, set()).add(value)
        if all(len(v) == 1 for v in per_method.values()):
            for method, run in zip(methods, runs):
                result.by_method.setdefault(method, {})[key] = run.config.get(key)
        else:
            result.columns.append(key)
    return result


def preamble(lay: Layout) -> List[str]:
    lines = []
    same = {k: v for k, v in lay.same.items() if v is not None}   # unset: nothing to say
    if same:
        lines.append("same in every run: " + ", ".join(f"{k}={display(k, v)}"
                                                        for k, v in same.items()))
    for method, settings in sorted(lay.by_method.items()):
        said = [f"{k}={display(k, v)}" for k, v in settings.items() if v is not None]
        if said:
            lines.append(f"{method}: " + ", ".join(said))
    return lines + [NOTE]


def display(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("final_accuracy", "best_accuracy") and is_number(value):
        return f"{100 * value:.2f}%"
    if column in ("bytes_up", "bytes_down") and is_number(value):
        from .train.results import human_bytes
        return human_bytes(value)
    if column in ("compression_ratio", "ratio_up", "ratio_down") and is_number(value):
        return f"{value:.1f}x"
    if column in ("wall_time", "time_to_target") and is_number(value):
        return f"{value:.1f} s"
    if column == "samples_per_s" and is_number(value):
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return _canonical(value)
    return str(value)


def display_columns(rows: Sequence[Dict[str, Any]], option_cols: Sequence[str]) -> List[str]:
    cols = ["method", "run"] + list(option_cols)
    return cols + [c for c in DISPLAY_METRICS if rows and c in rows[0]]


def relative_runs(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows whose ``run`` is shortened to the path below the runs' common folder."""
    # absolute, so that runs given as relative and absolute paths share a common folder
    paths = [os.path.abspath(r["run"]) for r in rows]
    if len(paths) < 2:
        common = str(Path(paths[0]).parent) if paths else ""
    else:
        common = os.path.commonpath(paths)
    out = []
    for row, path in zip(rows, paths):
        relative = os.path.relpath(path, common) if common else row["run"]
        out.append({**row, "run": relative if relative != "." else Path(path).name})
    return out


def _group_title(values: Dict[str, Any]) -> str:
    return ", ".join(f"{k} = {display(k, v)}" for k, v in values.items())


def to_markdown(groups, columns: Sequence[str], notes: Sequence[str] = ()) -> str:
    parts = [f"{line}  " for line in notes] + ([""] if notes else [])
    for values, rows in groups:
        if values:
            parts += ["### " + _group_title(values), ""]
        parts.append("| " + " | ".join(header(c) for c in columns) + " |")
        parts.append("|" + "|".join("---:" if c in DISPLAY_METRICS else "---"
                                    for c in columns) + "|")
        for row in relative_runs(rows):
            cells = [display(c, row.get(c)).replace("|", "\\|") for c in columns]
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def rich_tables(groups, columns: Sequence[str]):
    from rich.table import Table
    tables = []
    for values, rows in groups:
        table = Table(title=_group_title(values) or None)
        for c in columns:
            table.add_column(header(c), justify="right" if c in DISPLAY_METRICS else "left",
                             no_wrap=c in ("run", "method"), overflow="fold")
        for row in relative_runs(rows):
            table.add_row(*[display(c, row.get(c)) for c in columns])
        tables.append(table)
    return tables


def to_csv(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: (_canonical(row.get(c)) if isinstance(row.get(c), (dict, list))
                             else row.get(c)) for c in columns})
    return buffer.getvalue()


def to_json(rows: Sequence[Dict[str, Any]], skipped: Sequence[Skipped], what: str = "runs") -> str:
    return json.dumps({what: list(rows),
                       "skipped": [{"path": str(s.path), "kind": s.kind, "reason": s.reason}
                                   for s in skipped]}, indent=2, default=str, ensure_ascii=False)
