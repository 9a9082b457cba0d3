"""Run directories as ``hvdcomp collect`` reads them (docs/design.md, "Run directories"): every
folder under the given roots that holds a ``config.json`` (:func:`find_run_dirs`); a run enters
the table (:class:`Run`) only when its ``summary.json`` says ``"status": "completed"``; runs
still going or stopped early, and corrupt ones (unparsable JSON, a damaged line inside
``metrics.jsonl``, missing summary fields), are :class:`Skipped` with the reason, never a crash
(:func:`load_runs`).  The tables and figures are :mod:`hvdcomp.collect`'s."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .errors import UserError

#: summary.json fields a completed run must have (docs/design.md).
SUMMARY_FIELDS = ("final_accuracy", "best_accuracy", "wall_time", "bytes_up", "bytes_down")


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
    missing = [k for k in SUMMARY_FIELDS if not is_number(summary.get(k))]
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


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
