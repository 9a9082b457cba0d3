"""Waiting for a sweep's jobs, and the output of one point (``hvdcomp slurm wait`` / ``logs``).

``wait`` polls the status of every submitted point until none is pending, running or requeued
(a job Slurm requeues before its time limit or after preemption goes back to PENDING and is
waited for), reporting each change of the counts; the polling interval grows from ``poll`` to
``max_poll`` seconds while nothing changes, to go easy on slurmctld during long sweeps.
"""
from __future__ import annotations

import difflib
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from .errors import UserError
from .slurm_render import SweepPaths
from .slurmjobs import PointStatus, load_records, status
from .slurmquery import TERMINAL_STATES, SlurmRefused
from .sweep import SweepSpec

#: States that end a point's wait: Slurm's terminal ones, plus jobs no Slurm command knows.
_DONE = TERMINAL_STATES | {"UNKNOWN"}


@dataclass
class Progress:
    """Counts of the submitted points by state, for one line of progress."""
    total: int
    by_state: Counter
    not_submitted: int

    @property
    def finished(self) -> int:
        return sum(n for state, n in self.by_state.items() if state in _DONE)

    def line(self) -> str:
        done = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.by_state.items()) if s in _DONE)
        going = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.by_state.items())
                          if s not in _DONE)
        text = f"{self.finished}/{self.total} finished" + (f" ({done})" if done else "")
        text += f"; {going}" if going else ""
        return text + (f"; {self.not_submitted} not submitted" if self.not_submitted else "")


def progress(rows: List[PointStatus]) -> Progress:
    submitted = [r for r in rows if r.job_id is not None]
    return Progress(len(submitted), Counter(r.state for r in submitted),
                    len(rows) - len(submitted))


def wait(spec: SweepSpec, paths: SweepPaths, timeout: Optional[float] = None,
         poll: float = 2.0, max_poll: float = 30.0,
         on_progress: Optional[Callable[[Progress], None]] = None) -> List[PointStatus]:
    """Poll until every submitted point's job has ended; the final status rows. ``timeout``
    (seconds, None: no limit) raises SlurmRefused naming the points still going."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last_line, interval = None, poll
    while True:
        rows = status(spec, paths)
        now = progress(rows)
        if now.line() != last_line:
            last_line, interval = now.line(), poll
            if on_progress is not None:
                on_progress(now)
        if all(r.job_id is None or r.state in _DONE for r in rows):
            return rows
        if deadline is not None and time.monotonic() > deadline:
            going = [f"{r.point}={r.state}" for r in rows if r.job_id and r.state not in _DONE]
            raise SlurmRefused(f"jobs still not finished after {timeout:.0f} s: {', '.join(going)}")
        left = None if deadline is None else deadline - time.monotonic()
        time.sleep(interval if left is None else max(0.0, min(interval, left)))
        interval = min(interval * 1.5, max_poll)


def failed(rows: List[PointStatus]) -> List[PointStatus]:
    """Points whose job ended other than COMPLETED with exit code 0, or that were never
    submitted and have no completed run."""
    return [r for r in rows
            if (r.job_id is None and r.run != "completed")
            or (r.job_id is not None and (r.state != "COMPLETED"
                                          or r.exit_code not in (None, "0:0")))]


def point_log(spec: SweepSpec, paths: SweepPaths, point: str) -> Optional[Path]:
    """The output file of ``point``'s latest job (None when it has none yet). A point that is
    not in the spec, or was never submitted, is a UserError naming the choices."""
    names = [p.name for p in spec.points]
    if point not in names:
        close = difflib.get_close_matches(point, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"no point {point!r} in {spec.path}; {hint}points: {', '.join(names)}")
    record = load_records(spec, paths).get(point)
    if record is None:
        raise UserError(f"point {point!r} was never submitted (no {paths.record(point)}): "
                        f"`hvdcomp slurm submit {spec.path}` first")
    log = Path(record.log)
    return log if log.exists() else None
