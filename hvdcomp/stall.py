"""The stall guard: a collective that does not complete in time ends the whole job, with a message.

No configuration check can foresee everything: a rank stopped with SIGSTOP, a rank stuck in a
dead file system, a rank that took another code path. Its peers then wait in a collective for
ever; Horovod's own stall inspector only warns. Every blocking wait of hvdcomp (the exchange's
``Handle.wait``, the training loop's metric and checkpoint collectives) runs inside
:func:`waiting`; a watchdog thread checks those waits once per second, and when one has lasted
longer than the timeout it prints which collective this rank waits on (and the step, bucket and
phase its name carries) and ends the process with :data:`STALL_EXIT_CODE`. The launcher (mpirun,
horovodrun, ``srun --kill-on-bad-exit``) then ends every other rank: no hang, and one line that
names the cause.

The timeout: ``HVDCOMP_STALL_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT`; ``0`` turns the
guard off), or :func:`set_timeout` (``hvdcomp train --stall-timeout``). Only time spent *waiting
for other ranks* counts, never computation; a healthy job waits at most for the slowest rank's
step, so the default leaves a wide margin for anything but a step that takes minutes (raise it
there).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Dict, Iterator, Optional, Tuple

#: seconds a collective may wait for the other ranks before the job is ended
DEFAULT_TIMEOUT = 60.0
#: exit status of a rank ended by the guard (1 is a crash, 2 bad input, 3 --stop-after-steps)
STALL_EXIT_CODE = 4
ENV = "HVDCOMP_STALL_TIMEOUT"

_lock = threading.Lock()
_waits: Dict[int, Tuple[str, float]] = {}   # thread id -> (what it waits on, since when)
_timeout: Optional[float] = None            # None: read the environment on first use
_watchdog: Optional[threading.Thread] = None
_where = ""                                 # what the process is doing, e.g. "step 17 of 440"


def timeout() -> float:
    """The timeout in force, in seconds (0: the guard is off)."""
    global _timeout
    if _timeout is None:
        raw = os.environ.get(ENV, "").strip()
        try:
            _timeout = float(raw) if raw else DEFAULT_TIMEOUT
        except ValueError:
            raise ValueError(f"{ENV}={raw!r}: expected a number of seconds (0 turns the stall "
                             "guard off)") from None
        if _timeout < 0:
            raise ValueError(f"{ENV}={raw!r}: must be >= 0 seconds (0 turns the guard off)")
    return _timeout


def set_timeout(seconds: float) -> None:
    """Override the environment's timeout for this process (``0`` turns the guard off)."""
    global _timeout
    if seconds < 0:
        raise ValueError(f"stall timeout must be >= 0 seconds, got {seconds}")
    _timeout = float(seconds)


def note(where: str) -> None:
    """Say what the process is doing (``"step 17 of 440"``), for the guard's message."""
    global _where
    _where = where


@contextlib.contextmanager
def waiting(what: str) -> Iterator[None]:
    """Run the body (a blocking wait on other ranks) under the guard; ``what`` names it."""
    if timeout() <= 0:
        yield
        return
    _ensure_watchdog()
    me = threading.get_ident()
    with _lock:
        outer = _waits.get(me)
        if outer is None:           # nested waits keep the outermost start time
            _waits[me] = (what, time.monotonic())
    try:
        yield
    finally:
        if outer is None:
            with _lock:
                _waits.pop(me, None)


def _ensure_watchdog() -> None:
    global _watchdog
    with _lock:
        if _watchdog is not None and _watchdog.is_alive():
            return
        _watchdog = threading.Thread(target=_watch, name="hvdcomp-stall-guard", daemon=True)
        _watchdog.start()


def _watch() -> None:
    while True:
        time.sleep(min(1.0, max(0.05, timeout() / 10)))
        limit = timeout()
        if limit <= 0:
            continue
        now = time.monotonic()
        with _lock:
            stalled = [(what, now - since) for what, since in _waits.values()
                       if now - since > limit]
        if stalled:
            _end_job(*stalled[0], limit)


def _end_job(what: str, waited: float, limit: float) -> None:
    # torchrun's RANK before Slurm's: under `srun torchrun` SLURM_PROCID numbers nodes, not ranks
    names = ("HOROVOD_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
    rank = next((os.environ[name] for name in names if os.environ.get(name)), "0")
    during = f" during {_where}" if _where else ""
    print(f"Error (rank {rank}): collective {what}{during} has waited {waited:.0f} s for the "
          f"other ranks "
          f"(stall timeout {limit:g} s): a rank is stopped, dead or running different "
          f"collectives; ending the job. Raise the limit with --stall-timeout or {ENV} if a "
          "step really takes that long.", file=sys.stderr, flush=True)
    os._exit(STALL_EXIT_CODE)
