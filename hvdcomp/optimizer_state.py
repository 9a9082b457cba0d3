"""Error-feedback state in checkpoints, in Horovod's habits.

An optimizer with error feedback adds one entry to its ``state_dict()``::

    state["hvdcomp"] = {"format": 2, "world_size": N, "round": k,
                        "ranks": {rank: {"algorithm": ..., "dense": ..., "bytes": ...}, ...}}

``state_dict()`` never communicates (Horovod scripts call it on rank 0 alone, and a collective
there would hang): it holds this rank's slice, or every rank's after
``optimizer.consolidate_state_dict()`` (called on every rank; it gathers the slices to rank 0, as
``torch.distributed.optim.ZeroRedundancyOptimizer`` does). ``load_state_dict`` takes this rank's
own slice; the two habits of Horovod scripts both restore every rank exactly from one file:

* every rank loads rank 0's file;
* rank 0 loads it and calls ``hvd.broadcast_optimizer_state(optimizer, 0)``: every rank calls
  ``state_dict()`` first thing there, so that call broadcasts the loaded entry from the root and
  every rank takes its slice.

A checkpoint from another number of ranks, or one without this rank's slice, is refused with one
message naming the way on: ``load_state_dict(state, reset_error_feedback=True)`` (errors at zero,
round counter at 0 on every rank).
"""
from __future__ import annotations

import io
import sys
from typing import Any, Dict, Optional

import torch

from .comm.base import framed, length_header, unframe
from .errors import UserError

FORMAT = 2
KEY = "hvdcomp"


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's error-feedback state cannot be restored on this rank."""


def entry(own_slice, comm, round_: int, consolidated: Optional[Dict[int, Any]]) -> Dict[str, Any]:
    """The ``"hvdcomp"`` entry of ``state_dict()``: every gathered slice, else this rank's."""
    ranks = dict(consolidated) if consolidated is not None else {comm.rank: own_slice}
    return {"format": FORMAT, "world_size": comm.size, "round": round_, "ranks": ranks}


def normalise(saved: Dict[str, Any]) -> Dict[str, Any]:
    """Accept the format-1 entry (one rank's state: ``rank``, ``size``, ``algorithm``...)."""
    if saved.get("format") == FORMAT:
        return saved
    if "rank" in saved and "size" in saved:
        slice_ = {k: saved[k] for k in ("algorithm", "dense", "bytes")}
        return {"format": FORMAT, "world_size": saved["size"],
                "round": saved["algorithm"].get("step"), "ranks": {saved["rank"]: slice_}}
    raise CheckpointMismatchError("the checkpoint's 'hvdcomp' entry is not one hvdcomp wrote")


def pick(saved: Dict[str, Any], comm) -> Dict[str, Any]:
    """This rank's slice of ``saved`` (see the module docstring for the refusals)."""
    saved = normalise(saved)
    if saved["world_size"] != comm.size:
        raise CheckpointMismatchError(
            f"the checkpoint holds the error-feedback state of {saved['world_size']} ranks and "
            f"this job has {comm.size}: resume with {saved['world_size']} ranks, or call "
            "optimizer.load_state_dict(state, reset_error_feedback=True) on every rank to keep "
            "the optimizer's state and start the error feedback at zero")
    mine = saved["ranks"].get(comm.rank)
    if mine is None:
        raise _missing_slices(saved, [comm.rank])
    return mine


def require_every_rank(saved: Dict[str, Any], comm) -> None:
    """The same refusal on every rank when a broadcast entry lacks some rank's slice."""
    saved = normalise(saved)
    missing = [r for r in range(comm.size) if r not in saved["ranks"]]
    if saved["world_size"] == comm.size and missing:
        raise _missing_slices(saved, missing)


def _missing_slices(saved: Dict[str, Any], missing) -> CheckpointMismatchError:
    held = ", ".join(str(r) for r in sorted(saved["ranks"]))
    ranks = "rank" if len(missing) == 1 else "rank(s)"
    return CheckpointMismatchError(
        f"the checkpoint holds the error-feedback state of rank(s) {held} only, not of {ranks} "
        f"{', '.join(map(str, missing))}: call optimizer.consolidate_state_dict() on every rank "
        "before rank 0 saves optimizer.state_dict() (it gathers every rank's state into rank "
        "0's), or call optimizer.load_state_dict(state, reset_error_feedback=True) on every rank "
        "to start the error feedback at zero")


def gather(own_slice, comm, to: int, name: str) -> Optional[Dict[int, Any]]:
    """Collective: every rank's slice on rank ``to`` (None elsewhere)."""
    gathered = comm.allgather(framed(_serialised(own_slice)), name)
    if comm.rank != to:
        return None
    return {rank: _from_bytes(data) for rank, data in enumerate(unframe(gathered, comm.size))}


def broadcast(comm, loaded: Optional[Dict[str, Any]], root: int, name: str):
    """Collective: rank ``root``'s ``loaded`` entry (or None) on every rank."""
    payload = _to_tensor(loaded) if comm.rank == root else torch.empty(0, dtype=torch.uint8)
    length = comm.broadcast(length_header(payload.numel()), root, f"{name}.length")
    n = int.from_bytes(bytes(length.tolist()), "little")
    if comm.rank != root:
        payload = torch.zeros(n, dtype=torch.uint8)
    data = comm.broadcast(payload, root, f"{name}.data")
    return _from_bytes(data.numpy().tobytes())


def root_in(comm, root: int) -> int:
    """``comm``'s rank of the root Horovod named by its global rank (the same rank on the global
    process set); an error naming both when the root is outside ``comm``'s process set."""
    rank_of = getattr(comm, "rank_of", None)
    if rank_of is None:
        return root
    rank = rank_of(root)
    if rank is None:
        raise ValueError(f"hvd.broadcast_optimizer_state(root_rank={root}): rank {root} is not in "
                         f"the optimizer's process set (ranks {list(comm.process_set.ranks)}), "
                         "which holds its error-feedback state; broadcast from one of its ranks")
    return rank


def broadcast_root() -> Optional[int]:
    """``root_rank`` when the caller of ``state_dict()`` is ``hvd.broadcast_optimizer_state``
    (which every rank calls), else None."""
    try:
        frame = sys._getframe(2)
    except ValueError:  # called from the bottom of the stack: nobody's broadcast
        return None
    code = frame.f_code
    if code.co_name == "broadcast_optimizer_state" and \
            frame.f_globals.get("__name__", "").startswith("horovod.torch"):
        return int(frame.f_locals["root_rank"])
    return None


def _serialised(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _to_tensor(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(_serialised(obj)), dtype=torch.uint8)


def _from_bytes(raw: bytes) -> Any:
    return torch.load(io.BytesIO(raw), weights_only=False)
