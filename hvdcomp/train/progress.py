"""Rank 0's progress output: a live bar on a terminal, plain lines everywhere else.

Logs are read by tools (a Slurm ``.out`` file, ``grep``, a CI log), so colours and the redrawn
bar appear only when both stdout and stderr are terminals. Under ``mpirun`` a rank's stdout is
a pseudo-terminal even when mpirun's own output goes to a file, while its stderr is a pipe; so
one terminal alone is not enough to draw. Off a terminal the run prints one plain line per
epoch and one every tenth of the run (or every :data:`LINE_SECONDS` seconds, whichever comes
first), so a log shows progress between epochs.

On a terminal the bar is drawn on stderr. Horovod's C++ core writes its warnings straight to
file descriptor 2, past Python's ``sys.stderr``; while the bar is live, descriptor 2 is a pipe
whose lines are printed above the bar, so they never break into its line.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Dict

#: Longest gap between two plain progress lines, in seconds.
LINE_SECONDS = 60.0
#: Plain progress lines per run, besides the per-epoch ones.
LINES_PER_RUN = 10


def is_terminal() -> bool:
    """True when colours and a redrawn bar are welcome: stdout and stderr are both terminals.
    ``FORCE_COLOR`` set in the environment says yes, ``NO_COLOR`` or ``TERM=dumb`` says no."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class _Fd2Lines:
    """While active, file descriptor 2 is a pipe; a thread hands each line to ``emit``."""

    def __init__(self, emit):
        self.emit = emit
        self.saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True)
        self.thread.start()

    def _pump(self, read_end: int) -> None:
        with os.fdopen(read_end, "r", errors="replace") as lines:
            for line in lines:
                self.emit(line.rstrip("\n"))

    def close(self) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)   # closes the pipe's last write end: the pump sees EOF
        os.close(self.saved)
        self.thread.join(timeout=5)


class ProgressReporter:
    """Progress of one run on rank 0 (``enabled``); does nothing on other ranks or with --quiet."""

    def __init__(self, enabled: bool, total: int, done: int, steps_per_epoch: int = 0):
        self.enabled = enabled
        self.total, self.done = total, done
        self.steps_per_epoch = steps_per_epoch
        self.progress = self.task = self.fd2 = None
        self.started = self.last_line = time.monotonic()
        self.start_done = done
        self.every = max(1, total // LINES_PER_RUN)
        if enabled and is_terminal():
            self._start_bar()

    def _start_bar(self) -> None:
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
        except ImportError:
            return
        console = Console(file=os.fdopen(os.dup(2), "w"), stderr=False)
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.total, completed=self.done,
                                           status="")
        try:
            self.fd2 = _Fd2Lines(lambda line: self.progress.console.print(line, markup=False,
                                                                           highlight=False))
        except OSError:
            self.fd2 = None   # no descriptor to spare: the bar still works, lines may cross it

    def advance(self, loss: float) -> None:
        if not self.enabled:
            return
        self.done += 1
        if self.progress is not None:
            self.progress.update(self.task, advance=1, status=f"loss {loss:.4f}")
            return
        now = time.monotonic()
        if self.done < self.total and (self.done % self.every == 0
                                       or now - self.last_line >= LINE_SECONDS):
            self.last_line = now
            print(self._step_line(loss, now), flush=True)

    def _step_line(self, loss: float, now: float) -> str:
        elapsed = now - self.started
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = f"  eta {(self.total - self.done) / rate:.0f}s" if rate > 0 else ""
        epoch = f"  epoch {self.done / self.steps_per_epoch:.2f}" if self.steps_per_epoch else ""
        return (f"step {self.done}/{self.total} ({100 * self.done / self.total:.0f}%){epoch}  "
                f"loss {loss:.4f}  {elapsed:.1f}s{eta}")

    def epoch_line(self, record: Dict[str, Any], quiet: bool = False) -> None:
        if not self.enabled or quiet:
            return
        line = (f"epoch {record['epoch']:.2f}  step {record['step']}  loss {record['loss']:.4f}  "
                f"test acc {100 * record['test_accuracy']:.2f}%  {record['wall_time']:.1f}s")
        self.last_line = time.monotonic()
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.fd2 is not None:
            self.fd2.close()
            self.fd2 = None
        if self.progress is not None:
            self.progress.stop()
            self.progress.console.file.close()
            self.progress = None

