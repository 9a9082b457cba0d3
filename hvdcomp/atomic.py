"""Atomic file writes: readers (and a run killed mid-write) see the old file or the new one,
never half of one. Used for run summaries, checkpoints and Slurm job records."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Optional


def atomic_write(path: Path, write: Callable[[IO], None], binary: bool = False,
                 mode: Optional[int] = None) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path`` (``os.replace`` is atomic within one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str, mode: Optional[int] = None) -> None:
    atomic_write(path, lambda handle: handle.write(text), mode=mode)
