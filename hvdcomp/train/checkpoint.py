"""Checkpoints: one shard per rank, written by that rank, and a manifest written by rank 0.

Layout (docs/design.md), in ``RUN_DIR/checkpoints/``::

    ckpt-<step>.rank<r>.shard   rank r's state at <step>, written by rank r
    ckpt-<step>.pt              the manifest: written by rank 0 once every shard is durable
    latest.pt                   a symbolic link to the newest manifest (a copy where the file
                                system has no links)

Choice: **a shard per rank, no gathering.** Each rank's state differs: its error-feedback
memories (worker errors; the server error of the chunks it owns), and for algorithms whose local
models drift between synchronisations (LIEC-SGD) even its parameters and BatchNorm statistics.
Every rank writes its own ``{"model", "optimizer", "rng", "progress"}`` atomically
(:mod:`hvdcomp.atomic`: temporary file, fsync, rename, fsync of the folder), so no rank ever holds
another's state and nothing crosses the network but one flag per rank. Then the ranks agree that
every shard was written (one allreduce of "written" flags, :func:`save_sharded`): a rank whose
write failed raises its own error, the others a :class:`ShardWriteFailed` naming it, and no
manifest is written. Only after that agreement does rank 0 write the manifest and point
``latest.pt`` at it, so a manifest always names shards that are complete and durable; a run
killed in between leaves shards without a manifest, which a resume never sees (it starts from
the newest manifest; :func:`prune` removes such orphans later). The folder must be shared by the
ranks (a run directory on a cluster file system), as the run directory is.

On ``--resume`` each rank reads the manifest and its own shard only (:func:`load_for_rank`); the
world size must be the one the checkpoint was written with. Either engine (Horovod,
torch.distributed) restores either's checkpoints: the shards hold plain ``state_dict`` s.

Manifest contents (``torch.save`` of a dict)::

    format      "hvdcomp-train-checkpoint/2"
    step        optimizer steps completed (global, same on every rank)
    epoch       epoch the next step belongs to; step_in_epoch: its position in that epoch
    config      the resolved configuration (compared on resume)
    world_size  N
    shards      ["ckpt-<step>.rank0.shard", ...], one per rank, in rank order
    progress    rank 0's counters (bytes, times, best accuracy, ...), for readers of the file

Shard contents: ``format`` ("hvdcomp-train-shard/1"), ``step``, ``rank``, ``world_size``,
``model`` (state_dict), ``optimizer`` (state_dict), ``rng`` and ``progress`` (that rank's running
sums and counters). :func:`load_all` gives a manifest with every shard under ``ranks`` (tools,
tests). Checkpoints of format 1 (one file holding every rank's state under ``ranks``) still load.
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

FORMAT = "hvdcomp-train-checkpoint/2"
#: one file holding every rank's state (hvdcomp before sharded checkpoints); still read
LEGACY_FORMAT = "hvdcomp-train-checkpoint/1"
SHARD_FORMAT = "hvdcomp-train-shard/1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_SHARD = re.compile(r"^ckpt-(\d+)\.rank(\d+)\.shard$")


class CheckpointError(UserError, ValueError):
    pass


class ShardWriteFailed(OSError):
    """Another rank could not write its shard (this rank's own failure raises its OSError)."""


def shard_name(step: int, rank: int) -> str:
    return f"ckpt-{step}.rank{rank}.shard"


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


def _atomic_save(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:mod:`hvdcomp.atomic`)."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f), binary=True)
    except RuntimeError as exc:
        # torch.save's zip writer turns a failed write (a full disk) into "unexpected pos":
        # report the OSError underneath, naming the file, as any other write would
        cause = exc.__context__
        if not isinstance(cause, OSError):
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from exc


def write_shard(directory: Path, step: int, rank: int, world_size: int,
                state: Dict[str, Any]) -> Path:
    """This rank's ``state`` as ``ckpt-<step>.rank<rank>.shard``, atomically and durably."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / shard_name(step, rank)
    _atomic_save(path, {"format": SHARD_FORMAT, "step": int(step), "rank": int(rank),
                        "world_size": int(world_size), **state})
    return path


def save_sharded(comm, directory: Path, step: int, state: Dict[str, Any],
                 manifest: Dict[str, Any], keep: int = 2) -> Optional[Path]:
    """Collective (every rank calls it at the same step): every rank writes its shard, the ranks
    agree that all were written, then rank 0 writes the manifest (``manifest`` plus ``step``,
    ``world_size`` and ``shards``). Returns the manifest's path on rank 0, None elsewhere."""
    failure: Optional[OSError] = None
    try:
        write_shard(directory, step, comm.rank, comm.size, state)
    except OSError as exc:
        failure = exc
    written = torch.zeros(comm.size, dtype=torch.float64)
    written[comm.rank] = 0.0 if failure is not None else 1.0
    written = comm.allreduce(written, f"hvdcomp.train.ckpt.{step}.written", op="sum")
    if failure is not None:
        raise failure
    missing = [r for r in range(comm.size) if written[r] != 1.0]
    if missing:
        raise ShardWriteFailed(f"rank(s) {', '.join(map(str, missing))} could not write their "
                               f"checkpoint shard for step {step} in {directory}; no checkpoint "
                               "was recorded (that rank's error names the cause)")
    if comm.rank != 0:
        return None
    shards = [shard_name(step, r) for r in range(comm.size)]
    return save_checkpoint(directory, {**manifest, "step": int(step),
                                       "world_size": comm.size, "shards": shards}, keep=keep)


def save_checkpoint(directory: Path, state: Dict[str, Any], keep: int = 2) -> Path:
    """Write the manifest ``state`` as ``ckpt-<state['step']>.pt`` atomically, point
    ``latest.pt`` at it and delete all but the newest ``keep`` checkpoints (:func:`prune`).
    Returns the path written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state}
    path = checkpoint_path(directory, int(state["step"]))
    _atomic_save(path, state)
    _point_latest(directory, path)
    prune(directory, keep)
    return path


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` manifests, the shards of the deleted ones, and shards
    older than the newest manifest that no manifest names (a run killed between its shards and
    its manifest). Shards newer than the newest manifest are another checkpoint in progress."""
    manifests = list_checkpoints(directory)
    for old in manifests[:-keep]:
        old.unlink(missing_ok=True)
    kept = {_step_of(p) for p in manifests[-keep:]}
    newest = max(kept, default=-1)
    for shard in _shards(directory):
        step = int(_SHARD.match(shard.name).group(1))
        if step < newest and step not in kept:
            shard.unlink(missing_ok=True)


def remove_all(directory: Path) -> None:
    """Delete every manifest, shard and ``latest.pt`` in ``directory`` (``--overwrite``)."""
    for path in [*list_checkpoints(directory), *_shards(directory)]:
        path.unlink(missing_ok=True)
    (Path(directory) / "latest.pt").unlink(missing_ok=True)


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def _shards(directory: Path) -> List[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SHARD.match(p.name))


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


def _read(path: Path) -> Any:
    try:
        # weights_only=False: the optimizer's state may hold plain Python objects (configs).
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """A manifest (or a format-1 checkpoint), without its shards."""
    path = Path(path)
    state = _read(path)
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise CheckpointError(f"{path} is not an hvdcomp train checkpoint ({FORMAT})")
    return state


def load_shard(path: Path, rank: int) -> Dict[str, Any]:
    """Rank ``rank``'s state from the checkpoint at ``path`` (a manifest: its shard; format 1:
    its entry), checked against the manifest."""
    path = Path(path)
    manifest = load_checkpoint(path)
    if manifest["format"] == LEGACY_FORMAT:
        return manifest["ranks"][rank]
    if not 0 <= rank < len(manifest["shards"]):
        raise CheckpointError(f"{path} holds {len(manifest['shards'])} shards; rank {rank} has "
                              "none")
    shard_path = path.parent / manifest["shards"][rank]
    if not shard_path.exists():
        raise CheckpointError(f"checkpoint {path} names the shard {shard_path}, which is "
                              "missing: the run directory was changed by hand; resume from "
                              "another checkpoint (delete this manifest) or start over")
    shard = _read(shard_path)
    expected = (SHARD_FORMAT, manifest["step"], rank, manifest["world_size"])
    found = tuple(shard.get(k) for k in ("format", "step", "rank", "world_size")) \
        if isinstance(shard, dict) else None
    if found != expected:
        raise CheckpointError(f"{shard_path} is not rank {rank}'s shard of {path} (expected "
                              f"format, step, rank, world size {expected}, found {found})")
    return shard


def load_for_rank(path: Path, rank: int) -> Dict[str, Any]:
    """What ``--resume`` needs on rank ``rank``: the manifest, with this rank's shard as
    ``mine``."""
    manifest = load_checkpoint(path)
    state = {k: v for k, v in manifest.items() if k != "ranks"}
    return {**state, "mine": load_shard(path, rank)}


def load_all(path: Path) -> Dict[str, Any]:
    """The manifest with every rank's shard as ``ranks`` (a list in rank order): for tools and
    tests that look at every rank, as a format-1 file held them."""
    manifest = load_checkpoint(path)
    if manifest["format"] == LEGACY_FORMAT:
        return manifest
    return {**manifest, "ranks": [load_shard(path, r) for r in range(manifest["world_size"])]}


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
