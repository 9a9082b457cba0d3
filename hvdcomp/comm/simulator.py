"""An in-process simulator of N workers: the same algorithm code, N threads, one process.

    from hvdcomp.comm import simulate

    def worker(comm):                      # runs once per simulated rank
        return comm.allreduce(torch.full((3,), float(comm.rank)), name="demo").tolist()

    simulate(4, worker)                    # [[1.5, 1.5, 1.5], ...] one result per rank

Why threads and not processes: every worker shares one address space, so collectives are plain
tensor arithmetic, runs are deterministic and fast, and a test can look at every worker's state.

Determinism: a collective completes when all N workers have posted it (pairing is by name, then by
how many times each worker has used that name, as Horovod pairs by name); its result is computed
once, from the contributions in rank order: ``allreduce`` sums rank 0 + rank 1 + ... and, for
``"average"``, multiplies by ``1/N`` in the tensor's dtype, which is how Horovod's ``Average``
scales. (MPI may sum in another order; results agree bit for bit only where the sum is exact or
the order happens to match.) Nothing depends on thread timing.

No hangs: a worker that raises aborts the world, and every worker waiting on (or later posting) a
collective raises :class:`WorkerFailed`; :func:`simulate` then re-raises the lowest rank's own
exception. A worker that returns while others wait on a collective it never posted, a collective
posted with different shapes or kinds on different ranks, and a wait longer than ``timeout`` raise
a clear error on every worker too.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .base import Communicator, Handle, check_op, check_splits, scale_like_horovod

#: dtypes ``allreduce`` accepts, on the simulator and on Horovod alike
REDUCIBLE_DTYPES = (torch.float16, torch.float32, torch.float64)


class WorkerFailed(RuntimeError):
    """Raised in every simulated worker after another worker raised or left a collective
    unmatched."""


class _Slot:
    """One collective: what each rank posted, and the per-rank results once all have posted."""

    def __init__(self, kind: str, name: str, size: int):
        self.kind = kind
        self.name = name
        self.inputs: List[Optional[Tuple[torch.Tensor, Any]]] = [None] * size
        self.results: Optional[List[Any]] = None
        self.error: Optional[BaseException] = None
        self.collected = 0


class SimWorld:
    """The shared state of N simulated workers: pending collectives and the abort flag."""

    def __init__(self, size: int, timeout: float = 120.0):
        if size < 1:
            raise ValueError(f"a simulation needs at least one worker, not {size}")
        self.size = size
        self.timeout = timeout
        self._cond = threading.Condition()
        self._slots: Dict[Tuple[str, int], _Slot] = {}
        self._uses: List[Dict[str, int]] = [dict() for _ in range(size)]
        self._finished = [False] * size
        self.failure: Optional[Tuple[int, BaseException]] = None

    # --- called by workers ---------------------------------------------------------------------
    def post(self, rank: int, kind: str, name: str, tensor: torch.Tensor, meta: Any) -> Handle:
        with self._cond:
            self._raise_if_aborted()
            use = self._uses[rank].get(name, 0)
            self._uses[rank][name] = use + 1
            slot = self._slots.setdefault((name, use), _Slot(kind, name, self.size))
            # Clone: Horovod reads the input some time before completion; the caller may reuse it.
            slot.inputs[rank] = (tensor.detach().clone(), meta)
            if all(item is not None for item in slot.inputs):
                try:
                    slot.results = self._compute(kind, slot)
                except BaseException as exc:  # every rank gets the same error
                    slot.error = exc
                self._cond.notify_all()
        return Handle(lambda: self._collect(rank, (name, use)))

    def finished(self, rank: int) -> None:
        with self._cond:
            self._finished[rank] = True
            self._cond.notify_all()

    def abort(self, rank: int, exc: BaseException) -> None:
        with self._cond:
            if self.failure is None:
                self.failure = (rank, exc)
            self._cond.notify_all()

    # --- internals -----------------------------------------------------------------------------
    def _raise_if_aborted(self) -> None:
        if self.failure is not None:
            rank, exc = self.failure
            raise WorkerFailed(f"simulated worker {rank} failed: {type(exc).__name__}: {exc}")

    def _collect(self, rank: int, key: Tuple[str, int]) -> Any:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            slot = self._slots[key]
            while slot.results is None and slot.error is None:
                self._raise_if_aborted()
                missing = [r for r, item in enumerate(slot.inputs) if item is None]
                gone = [r for r in missing if self._finished[r]]
                if gone:
                    raise WorkerFailed(f"collective {slot.name!r}: worker(s) {gone} returned "
                                       "without posting it; ranks must issue the same collectives")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerFailed(f"collective {slot.name!r} timed out after {self.timeout} s "
                                       f"waiting for worker(s) {missing}")
                self._cond.wait(min(remaining, 1.0))
            slot.collected += 1
            if slot.collected == self.size:
                del self._slots[key]
            if slot.error is not None:
                raise slot.error
            return slot.results[rank]

    def _compute(self, kind: str, slot: _Slot) -> List[Any]:
        tensors = [item[0] for item in slot.inputs]
        metas = [item[1] for item in slot.inputs]
        _check_same_kind_and_dtype(slot.name, tensors, metas)
        combine = _COMBINERS.get(kind)
        if combine is None:
            raise AssertionError(kind)
        return combine(slot.name, tensors, metas, self.size)


# --- what each collective returns to each of the n ranks, from every rank's (tensor, meta) -----
def _check_same_kind_and_dtype(name: str, tensors: List[torch.Tensor], metas: List[tuple]) -> None:
    if len({meta[0] for meta in metas}) != 1:
        raise ValueError(f"collective {name!r} was posted as different operations on "
                         f"different ranks: {[meta[0] for meta in metas]}")
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(f"collective {name!r}: ranks sent different dtypes "
                         f"{[str(t.dtype) for t in tensors]}")


def _allreduce(name: str, tensors: List[torch.Tensor], metas: List[tuple], n: int) -> List[Any]:
    shapes = {tuple(t.shape) for t in tensors}
    ops = {meta[1] for meta in metas}
    if len(shapes) != 1 or len(ops) != 1:
        raise ValueError(f"allreduce {name!r}: ranks sent different shapes or ops "
                         f"{[tuple(t.shape) for t in tensors]} {[m[1] for m in metas]}")
    total = tensors[0].clone()
    for t in tensors[1:]:  # rank order: the result never depends on thread timing
        total.add_(t)
    if metas[0][1] == "average":
        total = scale_like_horovod(total, 1.0 / n)
    return [total.clone() for _ in range(n)]


def _allgather(name: str, tensors: List[torch.Tensor], metas: List[tuple], n: int) -> List[Any]:
    if len({tuple(t.shape[1:]) for t in tensors}) != 1:
        raise ValueError(f"allgather {name!r}: ranks sent tensors whose shapes differ "
                         f"beyond the first dimension: {[tuple(t.shape) for t in tensors]}")
    gathered = torch.cat(tensors)
    return [gathered.clone() for _ in range(n)]


def _alltoall(name: str, tensors: List[torch.Tensor], metas: List[tuple], n: int) -> List[Any]:
    pieces = [torch.split(t, meta[1]) for t, meta in zip(tensors, metas)]
    return [(torch.cat([pieces[src][dst] for src in range(n)]),
             [metas[src][1][dst] for src in range(n)]) for dst in range(n)]


def _broadcast(name: str, tensors: List[torch.Tensor], metas: List[tuple], n: int) -> List[Any]:
    roots = {meta[1] for meta in metas}
    if len(roots) != 1:
        raise ValueError(f"broadcast {name!r}: ranks named different roots {roots}")
    root = roots.pop()
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise ValueError(f"broadcast {name!r}: ranks sent different shapes")
    return [tensors[root].clone() for _ in range(n)]


_COMBINERS = {"allreduce": _allreduce, "allgather": _allgather, "alltoall": _alltoall,
              "broadcast": _broadcast}

class SimCommunicator(Communicator):
    """Rank ``rank`` of a :class:`SimWorld`; the collectives of :mod:`hvdcomp.comm.base`."""

    def __init__(self, world: SimWorld, rank: int):
        if not 0 <= rank < world.size:
            raise ValueError(f"rank {rank} outside a world of {world.size}")
        self.world = world
        self.rank = rank
        self.size = world.size

    def allreduce_async(self, tensor, name, op="average"):
        check_op(op)
        if tensor.dtype not in REDUCIBLE_DTYPES:
            raise TypeError(f"allreduce {name!r}: {tensor.dtype} cannot be reduced (Horovod's "
                            "torch binding reduces float16/32/64); send packed bytes with "
                            "allgather")
        return self.world.post(self.rank, "allreduce", name, tensor, ("allreduce", op))

    def allgather_async(self, tensor, name):
        return self.world.post(self.rank, "allgather", name, tensor, ("allgather",))

    def alltoall_async(self, tensor, splits, name):
        splits = check_splits(tensor, splits, self.size)
        return self.world.post(self.rank, "alltoall", name, tensor, ("alltoall", splits))

    def broadcast_async(self, tensor, root, name):
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} outside a world of {self.size}")
        return self.world.post(self.rank, "broadcast", name, tensor, ("broadcast", int(root)))


def simulate(n: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0,
             **kwargs: Any) -> List[Any]:
    """Run ``fn(comm, *args, **kwargs)`` for ``comm`` = rank 0..n-1 of one simulated world, each
    in its own thread; return the results in rank order.

    If any worker raises, every other worker raises :class:`WorkerFailed` at its next collective
    and ``simulate`` re-raises the exception of the lowest rank that raised one of its own (with
    its rank in a note), so the same failure is reported whatever the thread timing."""
    world = SimWorld(n, timeout)
    results: List[Any] = [None] * n
    errors: List[Optional[BaseException]] = [None] * n

    def run(rank: int) -> None:
        try:
            results[rank] = fn(SimCommunicator(world, rank), *args, **kwargs)
        except BaseException as exc:
            errors[rank] = exc
            world.abort(rank, exc)
        finally:
            world.finished(rank)

    threads = [threading.Thread(target=run, args=(rank,), name=f"hvdcomp-sim-{rank}", daemon=True)
               for rank in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [rank for rank in range(n) if errors[rank] is not None]
    if failed:
        # Deterministic choice: the lowest rank whose exception is its own (not a WorkerFailed
        # caused by another worker), else the lowest rank that failed.
        original = [rank for rank in failed if not isinstance(errors[rank], WorkerFailed)]
        rank = (original or failed)[0]
        exc = errors[rank]
        if hasattr(exc, "add_note"):
            exc.add_note(f"(raised by simulated worker {rank} of {n})")
        raise exc
    return results
