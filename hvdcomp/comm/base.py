"""The communicator interface: exactly the collectives hvdcomp's exchange needs, and no more.

Every collective is asynchronous: it returns a :class:`Handle` whose :meth:`Handle.wait` returns
the result, so the exchange can launch a bucket's uplink during backward and collect it later.
Every collective carries a ``name``; ranks pair collectives by name (as Horovod does), never by
call order, so ranks whose gradient hooks fire in different orders still pair the right tensors.
Names must be identical across ranks and unique among the collectives in flight. One engine
narrows this: ``torch.distributed`` pairs by launch order, so over
:class:`~hvdcomp.comm.torchdist.TorchDistCommunicator` (``pairs_by_name`` False) every rank must
also launch the named collectives in the same order; it checks that on every collective.

Semantics (identical for :class:`~hvdcomp.comm.horovod.HorovodCommunicator` and
:class:`~hvdcomp.comm.simulator.SimCommunicator`):

``allreduce_async(t, name, op="average")``
    elementwise sum over ranks (``op="sum"``), or that sum times ``1/size`` (``"average"``, like
    Horovod's ``Average``). Float tensors only.
``allgather_async(t, name)``
    concatenation along dim 0 of every rank's tensor, in rank order; first dimensions may differ.
``alltoall_async(t, splits, name)``
    rank r sends ``t[offset_j : offset_j + splits[j]]`` to rank j (dim 0) and receives the
    concatenation, in rank order, of what every rank sent to it. ``wait()`` returns
    ``(received, received_splits)``.
``broadcast_async(t, root, name)``
    rank ``root``'s tensor, on every rank.

Inputs are never modified; results are new tensors.

Blocking conveniences, built from the four collectives above (a communicator need not override
them; every one waits under the stall guard, through :meth:`Handle.wait`):

``allreduce(t, name, op)``, ``allgather(t, name)``, ``alltoall(...)``, ``broadcast(...)``
    the asynchronous collective, waited for.
``barrier(name)``
    returns once every rank has called it (a one-element allreduce).
``allgather_object(obj, name)`` / ``broadcast_object(obj, root, name)``
    any picklable object (``torch.save`` serialisation): every rank's, in rank order / the
    root's, on every rank.
``broadcast_state(state, root, name)``
    every tensor of a ``state_dict`` overwritten in place by rank ``root``'s (what
    ``hvd.broadcast_parameters`` does), one collective per tensor under ``name.<key>``.

Where a process runs: ``local_rank`` and ``local_size`` (the rank among the processes of this
node, and their number; a GPU rank picks its device by ``local_rank``).
"""
from __future__ import annotations

import abc
import contextlib
import io
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .. import stall

#: the reduction operations ``allreduce`` accepts
REDUCE_OPS = ("average", "sum")


class Handle:
    """A collective in flight; :meth:`wait` blocks until it completes and returns its result.

    ``wait()`` may be called more than once; the result is computed once. A handle with a
    ``name`` (the collective's) waits under the stall guard (:mod:`hvdcomp.stall`): a wait on
    other ranks that lasts past the timeout ends the job with a message naming the collective."""

    _UNSET = object()

    def __init__(self, wait_fn: Callable[[], Any], name: Optional[str] = None):
        self._wait_fn = wait_fn
        self._result: Any = Handle._UNSET
        self.name = name

    def wait(self) -> Any:
        if self._result is Handle._UNSET:
            guard = stall.waiting(repr(self.name)) if self.name else contextlib.nullcontext()
            with guard:
                self._result = self._wait_fn()
            self._wait_fn = None  # drop references to inputs once done
        return self._result

    @classmethod
    def done(cls, result: Any) -> "Handle":
        """A handle that is already complete (collectives on a single rank)."""
        handle = cls(lambda: result)
        handle.wait()
        return handle


class Communicator(abc.ABC):
    """``rank`` and ``size`` plus four asynchronous collectives (see the module docstring)."""

    rank: int
    size: int
    #: True when ranks pair collectives by name whatever order they launch them in (Horovod, the
    #: simulator); False when they pair by launch order (torch.distributed: every rank must then
    #: launch the same collectives in the same order, see :mod:`hvdcomp.comm.torchdist`)
    pairs_by_name: bool = True

    @abc.abstractmethod
    def allreduce_async(self, tensor: torch.Tensor, name: str, op: str = "average") -> Handle:
        """Sum or average of ``tensor`` over ranks; ``wait()`` returns a new tensor."""

    @abc.abstractmethod
    def allgather_async(self, tensor: torch.Tensor, name: str) -> Handle:
        """Concatenation along dim 0 in rank order; ``wait()`` returns a new tensor."""

    @abc.abstractmethod
    def alltoall_async(self, tensor: torch.Tensor, splits: Sequence[int], name: str) -> Handle:
        """Scatter ``tensor`` by ``splits`` (dim 0); ``wait()`` returns
        ``(received, received_splits)`` with ``received_splits`` a list of ints."""

    @abc.abstractmethod
    def broadcast_async(self, tensor: torch.Tensor, root: int, name: str) -> Handle:
        """Rank ``root``'s ``tensor`` on every rank; ``wait()`` returns a new tensor."""

    def allreduce_into_async(self, tensor: torch.Tensor, name: str,
                             op: str = "average") -> Handle:
        """As :meth:`allreduce_async`, with the result written into ``tensor`` itself (``wait()``
        returns ``tensor``), which the caller leaves alone until then.  The same values; an
        engine that reduces in place (Horovod) then needs no second buffer of the tensor's size.
        This default reduces out of place and copies back."""
        handle = self.allreduce_async(tensor, name, op)
        return Handle(lambda: tensor.copy_(handle.wait()), name)

    def broadcast_into_async(self, tensor: torch.Tensor, root: int, name: str) -> Handle:
        """As :meth:`broadcast_async`, with rank ``root``'s values written into ``tensor`` itself
        on every rank (``wait()`` returns ``tensor``), which the caller leaves alone until then.
        An engine that broadcasts in place (Horovod, Gloo) needs no second buffer; this default
        broadcasts a copy and copies back."""
        handle = self.broadcast_async(tensor, root, name)
        return Handle(lambda: tensor.copy_(handle.wait()), name)

    # --- blocking conveniences -----------------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "average") -> torch.Tensor:
        return self.allreduce_async(tensor, name, op).wait()

    def allgather(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return self.allgather_async(tensor, name).wait()

    def alltoall(self, tensor: torch.Tensor, splits: Sequence[int], name: str):
        return self.alltoall_async(tensor, splits, name).wait()

    def broadcast(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        return self.broadcast_async(tensor, root, name).wait()

    def barrier(self, name: str) -> None:
        """Return once every rank has reached this call."""
        self.allreduce(torch.zeros(1), name, op="sum")

    def allgather_object(self, obj: Any, name: str) -> List[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        gathered = self.allgather(framed(serialise(obj)), name)
        return [deserialise(data) for data in unframe(gathered, self.size)]

    def broadcast_object(self, obj: Any, root: int, name: str) -> Any:
        """Rank ``root``'s ``obj`` on every rank (the others' ``obj`` is ignored)."""
        payload = serialise(obj) if self.rank == root else b""
        length = self.broadcast(length_header(len(payload)), root, f"{name}.length")
        if self.rank != root:
            payload = bytes(int.from_bytes(bytes(length.tolist()), "little"))
        data = self.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8)
                              if payload else torch.zeros(0, dtype=torch.uint8), root,
                              f"{name}.data")
        return deserialise(data.numpy().tobytes())

    def broadcast_state(self, state: Dict[str, torch.Tensor], root: int, name: str) -> None:
        """Overwrite every tensor of ``state`` (a ``state_dict``) in place with rank ``root``'s,
        as ``hvd.broadcast_parameters`` does; the collectives run concurrently."""
        pending = [(tensor, self.broadcast_async(tensor.detach(), root, f"{name}.{key}"))
                   for key, tensor in sorted(state.items()) if isinstance(tensor, torch.Tensor)]
        for tensor, handle in pending:
            with torch.no_grad():
                tensor.copy_(handle.wait())

    @property
    def local_rank(self) -> int:
        """This process's rank among the processes of its node (default: its rank)."""
        return self.rank

    @property
    def local_size(self) -> int:
        """How many of the world's processes run on this node (default: all of them)."""
        return self.size

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"


def check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"allreduce op must be one of {REDUCE_OPS}, not {op!r}")


def check_splits(tensor: torch.Tensor, splits: Sequence[int], size: int) -> list:
    """Validate alltoall splits: one non-negative int per rank, summing to ``tensor.shape[0]``."""
    splits = [int(s) for s in splits]
    if len(splits) != size:
        raise ValueError(f"alltoall needs one split per rank ({size}), got {len(splits)}")
    if any(s < 0 for s in splits) or sum(splits) != tensor.shape[0]:
        raise ValueError(f"alltoall splits {splits} must be non-negative and sum to the first "
                         f"dimension of the tensor ({tensor.shape[0]})")
    return splits


def scale_like_horovod(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor · factor`` in place, in the tensor's own dtype, as Horovod applies its post-scale
    factor (``Average`` = sum, then · 1/size; checked on 3 MPI ranks: float64 and float32 results
    equal ``sum * (1/3)`` computed this way, and differ from ``sum / 3``)."""
    return tensor.mul_(factor)


def length_header(nbytes: int) -> torch.Tensor:
    """``nbytes`` as 8 little-endian ``uint8``: the frame header of :func:`framed`."""
    return torch.tensor(list(int(nbytes).to_bytes(8, "little")), dtype=torch.uint8)


def framed(data: bytes) -> torch.Tensor:
    """``data`` as a ``uint8`` tensor prefixed by its length, so that the ranks' documents of
    different lengths, concatenated by an allgather, can be split apart again (:func:`unframe`)."""
    body = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return torch.cat([length_header(len(data)), body])


def unframe(gathered: torch.Tensor, count: int) -> List[bytes]:
    """The ``count`` documents of an allgather of :func:`framed` tensors, in rank order."""
    raw = gathered.cpu().numpy().tobytes()
    documents, offset = [], 0
    for _ in range(count):
        n = int.from_bytes(raw[offset:offset + 8], "little")
        documents.append(raw[offset + 8:offset + 8 + n])
        offset += 8 + n
    return documents


def serialise(obj: Any) -> bytes:
    """``obj`` as bytes (``torch.save``: tensors and plain Python objects)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def deserialise(raw: bytes) -> Any:
    """The object :func:`serialise` wrote (``weights_only=False``: only ever the peers' own)."""
    return torch.load(io.BytesIO(raw), weights_only=False)
