"""One live run per run directory: a lock file, and the clean-up only its holder may do.

Two runs writing one folder (a second ``--overwrite`` or ``--resume`` started while the first
still trains) would both exit 0 and leave a mix of their results. Rank 0 of every run takes an
exclusive ``flock`` on ``RUN_DIR/.hvdcomp.lock`` before it changes anything in the folder, and
holds it until the process ends (the kernel drops it when the process dies, however it dies, so
a crashed run never leaves a stale lock behind). The file names the holder's host and PID, so
the second run's message says who is using the folder.

Holding the lock also makes it safe to remove what an interrupted writer left: temporary files
``.<name>.<random>.tmp`` of a checkpoint or summary whose writer was killed before the rename
(:mod:`hvdcomp.atomic`). A ResNet-18 run killed six times mid-checkpoint left about 1 GB of them.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import List, Optional

from .config import ConfigError

LOCK_NAME = ".hvdcomp.lock"


class RunLock:
    """The lock of one run directory, held by this process (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise ConfigError naming the live run that holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(f"{self.folder} is in use by a live run ({holder}); wait for it to "
                              "finish or stop it, or choose another --out") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing drops the flock; the file itself may stay
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {holder['host']}, PID {holder['pid']}, since {holder['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Delete the ``.*.tmp`` files an interrupted writer left in ``folder`` and its
    ``checkpoints/``; returns what was removed. Call only while holding the folder's lock."""
    removed = []
    for directory in (Path(folder), Path(folder) / "checkpoints"):
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
