"""The byte ledger: what one rank sends to other ranks, and the one ring-allreduce formula.

Every count in hvdcomp (the exchange's counters, ``bench comm``'s model of Horovod's allreduce,
the training loop's Horovod baseline, the compression ratio in the training results, the
Horovod-compatible optimizer) is the bytes of payload *this rank sends to other ranks*, as if
every collective were point-to-point sends: bytes a rank sends itself are not counted, nor the
collectives' own headers.

An allreduce is counted as a ring allreduce sends (the real bytes depend on the MPI or NCCL
algorithm): the reduce-scatter half as uplink, Σ_{j≠rank} |piece j|, the allgather half as
downlink, (N−1)·|piece rank|, the buffer cut into N pieces of ceil(d/N) elements
(:func:`ring_pieces`).  Averaged over ranks that is (N−1)/N of the buffer each way
(:func:`ring_allreduce_mean`).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes of ``numel`` elements of ``dtype``."""
    return numel * itemsize(dtype)


def ring_pieces(numel: int, size: int) -> List[Tuple[int, int]]:
    """``[(start, stop)]`` of the N pieces a ring allreduce cuts a buffer into (ceil(d/N) each,
    the last ones shorter or empty): the exchange's chunking rule with alignment 1."""
    per_rank = math.ceil(numel / size) if size else 0
    return [(min(j * per_rank, numel), min((j + 1) * per_rank, numel)) for j in range(size)]


def ring_allreduce_bytes(numel: int, item_bytes: int, world_size: int,
                         rank: int) -> Tuple[int, int]:
    """``(up, down)`` bytes rank ``rank`` sends in a ring allreduce of ``numel`` elements of
    ``item_bytes`` each: the reduce-scatter half up, the allgather half down."""
    pieces = ring_pieces(numel, world_size)
    up = sum((b - a) * item_bytes for j, (a, b) in enumerate(pieces) if j != rank)
    a, b = pieces[rank]
    return up, (world_size - 1) * (b - a) * item_bytes


def ring_allreduce_mean(buffer_bytes: float, world_size: int) -> float:
    """Bytes one rank sends *each way* in a ring allreduce of ``buffer_bytes``, averaged over
    ranks: (N−1)/N of the buffer (0 on one process)."""
    return (world_size - 1) / world_size * buffer_bytes if world_size else 0.0


class ByteLedger:
    """Cumulative bytes this rank sent: ``up``, ``down`` and ``by_phase`` (the same split by the
    phase that sent them), plus ``last_round`` (``{"up", "down"}`` of the last closed round)."""

    def __init__(self, world_size: int, rank: int):
        self.world_size = world_size
        self.rank = rank
        self.up = 0
        self.down = 0
        self.by_phase: Dict[str, int] = {}
        self.last_round = {"up": 0, "down": 0}
        self._round_start = (0, 0)

    def count(self, phase: str, up: int = 0, down: int = 0) -> None:
        self.up += up
        self.down += down
        self.by_phase[phase] = self.by_phase.get(phase, 0) + up + down

    def count_ring_allreduce(self, phase: str, numel: int, dtype: torch.dtype) -> None:
        up, down = ring_allreduce_bytes(numel, itemsize(dtype), self.world_size, self.rank)
        self.count(phase, up=up, down=down)

    def count_allgather(self, phase: str, numel: int, dtype: torch.dtype) -> None:
        """An allgather of this rank's ``numel`` elements: sent to the N−1 others (downlink)."""
        self.count(phase, down=(self.world_size - 1) * nbytes(numel, dtype))

    def restore(self, up: Optional[int] = None, down: Optional[int] = None) -> None:
        """Set the cumulative counters (resuming from a checkpoint); the round starts there."""
        self.up = self.up if up is None else int(up)
        self.down = self.down if down is None else int(down)
        self._round_start = (self.up, self.down)

    def close_round(self) -> None:
        self.last_round = {"up": self.up - self._round_start[0],
                           "down": self.down - self._round_start[1]}
        self._round_start = (self.up, self.down)

    def state_dict(self) -> Dict[str, object]:
        return {"bytes_up": self.up, "bytes_down": self.down,
                "bytes_by_phase": dict(self.by_phase)}

    def load_state_dict(self, state) -> None:
        self.restore(up=state["bytes_up"], down=state["bytes_down"])
        self.by_phase = dict(state["bytes_by_phase"])
