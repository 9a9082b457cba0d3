"""What a benchmark needs settled before it measures: where its results go, and whether its
buffers fit in memory.

A measurement can take minutes; finding out afterwards that ``--out`` cannot be written, or
that a ``--sizes`` entry asks for more memory than the machine has, wastes them (and used to lose
the results or end in an allocation traceback). :func:`check_output_file` and
:func:`check_sizes_fit` run before the first measurement; :func:`write_results` writes the JSON
atomically at the end and, if the disk refuses it anyway, says where the results still are.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from ..atomic import atomic_write_text, temporary_name
from ..errors import UserError

MIB = 1 << 20


class BenchError(UserError):
    """A benchmark option that cannot be honoured; the CLI prints one line and exits 2."""


def check_output_file(path: "str | Path", option: str = "--out") -> Path:
    """``path`` can be written: its folder exists and takes a new file, and an existing ``path``
    is a regular file that opens for writing (without truncating it). Returns the absolute path
    (ranks and relaunched processes may run elsewhere)."""
    path = Path(path).expanduser().absolute()
    folder = path.parent
    if not folder.is_dir():
        raise BenchError(f"{option} {path}: folder {folder} does not exist")
    if path.exists() and not path.is_file():
        raise BenchError(f"{option} {path}: not a regular file")
    try:
        if path.exists():
            with open(path, "r+b"):  # opens for writing, changes nothing
                pass
        probe = temporary_name(path)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BenchError(f"{option} {path}: cannot write there ({exc.strerror or exc}); "
                         "choose another file") from None
    return path


def write_results(path: "str | Path", text: str, option: str = "--out") -> None:
    """Write ``text`` to ``path`` atomically; BenchError if the disk refuses (the caller has
    printed the results by then, so the message says so)."""
    try:
        atomic_write_text(Path(path), text if text.endswith("\n") else text + "\n")
    except OSError as exc:
        raise BenchError(f"{option} {path}: writing the results failed ({exc.strerror or exc}); "
                         "they are printed above") from None


def available_memory(device: str = "cpu") -> Optional[int]:
    """Bytes a new allocation can get on ``device`` now: MemAvailable of /proc/meminfo on the
    CPU, free memory on a CUDA device; None when unknown (then nothing is checked)."""
    if str(device).startswith("cuda"):
        try:
            import torch
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - no CUDA: the device check reports that itself
            return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_sizes_fit(sizes_mib: Sequence[float], copies: float, device: str = "cpu",
                    option: str = "--sizes") -> None:
    """Every size, times ``copies`` (the buffers one measurement holds at once), fits in the
    memory available now; BenchError naming the size and both amounts otherwise."""
    available = available_memory(device)
    if available is None:
        return
    for size in sizes_mib:
        needed = size * MIB * copies
        if needed > available:
            raise BenchError(
                f"{option}: {size:g} MiB needs about {_gib(needed)} of memory on {device} "
                f"({copies:g} buffers of that size), {_gib(available)} is available; "
                "give smaller sizes")


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"
