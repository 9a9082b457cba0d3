"""Checkpoints: one file per checkpoint, holding every rank's state, written atomically by rank 0.

Layout (docs/design.md): ``RUN_DIR/checkpoints/ckpt-<step>.pt`` and ``latest.pt``, a symbolic
link to the newest (a copy where the file system has no links).

Choice: **gather to rank 0, one file.** Each rank's state differs: its error-feedback memories
(worker errors; the server error of the chunks it owns), and for algorithms whose local models
drift between synchronisations (LIEC-SGD) even its parameters and BatchNorm statistics. The loop
gathers every rank's ``{"model", "optimizer", "rng"}`` to rank 0 (``hvd.allgather_object``) and
rank 0 writes them as ``ranks[r]`` in one file. One file keeps the format of the run directory
simple and makes a checkpoint valid or absent as a whole (tmp file + ``os.replace``); the price is
that rank 0 holds N copies of the state while writing, acceptable for the models here (N × 45 MB
for ResNet-18). On ``--resume`` each rank loads the file and takes ``ranks[its rank]``; the world
size must be the one the checkpoint was written with.

File contents (``torch.save`` of a dict)::

    format      "hvdcomp-train-checkpoint/1"
    step        optimizer steps completed (global, same on every rank)
    epoch       epoch the next step belongs to; step_in_epoch: its position in that epoch
    config      the resolved configuration (compared on resume)
    world_size  N
    ranks       [ {"model": state_dict, "optimizer": state_dict, "rng": {...},
                   "progress": that rank's running sums and counters} for r in 0..N-1 ]
    progress    rank 0's counters (bytes, times, best accuracy, ...), for readers of the file
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..atomic import atomic_write, fsync_directory
from ..errors import UserError

FORMAT = "hvdcomp-train-checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(UserError, ValueError):
    pass


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step}.pt"


def list_checkpoints(directory: Path) -> List[Path]:
    """Checkpoints in ``directory`` sorted by step (oldest first); temp files are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Path) -> Optional[Path]:
    """``latest.pt`` when it resolves, else the highest-numbered ``ckpt-<step>.pt``, else None."""
    latest = Path(directory) / "latest.pt"
    if latest.exists():
        return latest.resolve() if latest.is_symlink() else latest
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: Path, state: Dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as ``ckpt-<state['step']>.pt`` atomically, point ``latest.pt`` at it and
    delete all but the newest ``keep`` checkpoints. Returns the path written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state}
    path = checkpoint_path(directory, int(state["step"]))
    try:
        atomic_write(path, lambda f: torch.save(state, f), binary=True)
    except RuntimeError as exc:
        # torch.save's zip writer turns a failed write (a full disk) into "unexpected pos":
        # report the OSError underneath, naming the file, as any other write would
        cause = exc.__context__
        if not isinstance(cause, OSError):
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from exc
    _point_latest(directory, path)
    for old in list_checkpoints(directory)[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _point_latest(directory: Path, target: Path) -> None:
    latest = directory / "latest.pt"
    tmp = directory / f".latest.pt.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target.name, tmp)  # relative, so the run directory can be moved
    except OSError:  # no symlinks on this file system: an atomic copy instead
        shutil.copyfile(target, tmp)
    os.replace(tmp, latest)
    fsync_directory(directory)   # the new name survives a crash, not only the file


def load_checkpoint(path: Path) -> Dict[str, Any]:
    path = Path(path)
    try:
        # weights_only=False: the optimizer's state may hold plain Python objects (configs).
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an hvdcomp train checkpoint ({FORMAT})")
    return state


def rng_state() -> Dict[str, Any]:
    """This process's global generators (the loop draws its own randomness from seeded
    generators, but models with dropout use the global one)."""
    import random

    import numpy as np
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
