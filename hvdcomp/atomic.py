"""Atomic file writes: readers (and a run killed mid-write) see the old file or the new one,
never half of one. Used for run summaries, checkpoints, sbatch scripts and Slurm job records.

The file gets the permissions any other new file would get: ``mode`` (0o666 by default) less the
process umask, and the folder's default ACL where it has one, because the temporary file is
created with ``open(O_CREAT | O_EXCL, mode)`` and the kernel applies both. (``tempfile.mkstemp``
would create it 0600, so a colleague's ``hvdcomp collect`` on a shared project folder could not
read the results.)

Durability: the temporary file is fsynced before the rename and the folder after it, so after a
crash or power loss the name points at the whole new file, not at an empty one.

Temporary files are named ``.<name>.<random>.tmp`` beside the target; a writer killed before the
rename leaves one behind, which whoever owns the folder may remove (train does at start).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import IO, Callable

DEFAULT_MODE = 0o666


def temporary_name(path: Path) -> Path:
    """A fresh ``.<name>.<random>.tmp`` beside ``path``."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def _create_exclusive(path: Path, mode: int) -> "tuple[int, Path]":
    """Open a new temporary file beside ``path`` (never an existing one): (fd, its path)."""
    while True:
        tmp = temporary_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                           mode), tmp
        except FileExistsError:  # 32 random bits collided: draw again
            continue


def fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable. File systems that cannot fsync a directory
    (some network mounts refuse it with EINVAL) are left as they are: the rename itself
    already happened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO], None], binary: bool = False,
                 mode: "int | None" = DEFAULT_MODE) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over ``path``
    (``os.replace`` is atomic within one filesystem) and fsync the folder.

    ``mode`` is the creation mode before the umask, as for ``open(2)``: 0o666 for data, 0o777 for
    an executable script."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_exclusive(path, DEFAULT_MODE if mode is None else mode)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str, mode: "int | None" = DEFAULT_MODE) -> None:
    atomic_write(path, lambda handle: handle.write(text), mode=mode)
