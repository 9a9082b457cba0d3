"""The communicator over ``horovod.torch``: MPI, Gloo or NCCL, whichever Horovod was built with.

Horovod facts this module absorbs so that the exchange need not know them:

* ``alltoall`` splits travel as an ``int32`` CPU tensor;
* ``synchronize`` of an alltoall handle returns ``(output, received_splits)``;
* the torch binding reduces float16/32/64 only (no bfloat16, no int8): compressed payloads
  therefore travel as ``uint8`` through ``allgather``/``alltoall``, which move bytes unchanged;
* ``Average`` is a sum followed by a float64 post-scale of ``1/size`` (the simulator copies it).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .base import Communicator, Handle, check_op, check_splits
from .simulator import REDUCIBLE_DTYPES


def _import_horovod():
    try:
        import horovod.torch as hvd
    except Exception as exc:  # ImportError, or a Horovod built against another torch
        raise RuntimeError(
            f"horovod.torch cannot be imported ({type(exc).__name__}: {exc}); install Horovod "
            "built against this torch (scripts/setup.sh), or use hvdcomp.comm.simulate for an "
            "in-process run") from exc
    return hvd


class HorovodCommunicator(Communicator):
    """Collectives of :mod:`hvdcomp.comm.base` on Horovod's global process set (or ``process_set``).

    ``hvd.init()`` must have been called."""

    def __init__(self, process_set: Optional[Any] = None):
        hvd = _import_horovod()
        if not hvd.is_initialized():
            raise RuntimeError("Horovod is not initialized: call hvd.init() before building the "
                               "communicator")
        self._hvd = hvd
        self._process_set = process_set if process_set is not None else hvd.global_process_set
        if not self._process_set.included():
            raise ValueError(f"this process (rank {hvd.rank()}) is not in {self._process_set}: "
                             "a communicator exists only on the ranks of its process set")
        self.rank = self._process_set.rank()
        self.size = self._process_set.size()

    @classmethod
    def start(cls) -> "HorovodCommunicator":
        """``hvd.init()`` (from the launcher's environment: mpirun, srun, horovodrun), then the
        communicator of the global process set."""
        _import_horovod().init()
        return cls()

    @property
    def local_rank(self) -> int:
        return self._hvd.local_rank()

    @property
    def local_size(self) -> int:
        return self._hvd.local_size()

    @property
    def hvd(self):
        """The ``horovod.torch`` module (for callers that make Horovod's own calls)."""
        return self._hvd

    @property
    def process_set(self):
        """The Horovod process set every collective of this communicator runs on."""
        return self._process_set

    def allreduce_async(self, tensor, name, op="average"):
        check_op(op)
        if tensor.dtype not in REDUCIBLE_DTYPES:
            raise TypeError(f"allreduce {name!r}: {tensor.dtype} cannot be reduced (Horovod's "
                            "torch binding reduces float16/32/64); send packed bytes with "
                            "allgather")
        hvd_op = self._hvd.Average if op == "average" else self._hvd.Sum
        handle = self._hvd.allreduce_async(tensor.contiguous(), name=name, op=hvd_op,
                                           process_set=self._process_set)
        return Handle(lambda: self._hvd.synchronize(handle), name)

    def allreduce_into_async(self, tensor, name, op="average"):
        """Horovod's in-place allreduce (the same C++ operation as the out-of-place one, with the
        output being the input: the same values, and no output buffer)."""
        if not tensor.is_contiguous():
            return super().allreduce_into_async(tensor, name, op)
        check_op(op)
        if tensor.dtype not in REDUCIBLE_DTYPES:
            return super().allreduce_into_async(tensor, name, op)   # raises allreduce's error
        hvd_op = self._hvd.Average if op == "average" else self._hvd.Sum
        handle = self._hvd.allreduce_async_(tensor, name=name, op=hvd_op,
                                            process_set=self._process_set)
        return Handle(lambda: self._hvd.synchronize(handle), name)

    def allgather_async(self, tensor, name):
        handle = self._hvd.allgather_async(tensor.contiguous(), name=name,
                                           process_set=self._process_set)
        return Handle(lambda: self._hvd.synchronize(handle), name)

    def alltoall_async(self, tensor, splits: Sequence[int], name):
        splits = check_splits(tensor, splits, self.size)
        split_tensor = torch.tensor(splits, dtype=torch.int32)  # Horovod requires int32, on CPU
        handle = self._hvd.alltoall_async(tensor.contiguous(), splits=split_tensor, name=name,
                                          process_set=self._process_set)

        def wait():
            received, received_splits = self._hvd.synchronize(handle)
            return received, [int(s) for s in received_splits.tolist()]
        return Handle(wait, name)

    def broadcast_async(self, tensor, root, name):
        handle = self._hvd.broadcast_async(tensor.contiguous(), root_rank=self._global(root),
                                           name=name, process_set=self._process_set)
        return Handle(lambda: self._hvd.synchronize(handle), name)

    def broadcast_into_async(self, tensor, root, name):
        """Horovod's in-place broadcast (the same C++ operation as the out-of-place one, with
        the output being the input)."""
        if not tensor.is_contiguous():
            return super().broadcast_into_async(tensor, root, name)
        handle = self._hvd.broadcast_async_(tensor, root_rank=self._global(root), name=name,
                                            process_set=self._process_set)
        return Handle(lambda: self._hvd.synchronize(handle), name)

    def rank_of(self, global_rank: int) -> Optional[int]:
        """This communicator's rank of Horovod's global rank ``global_rank`` (None outside the
        set): for a root that Horovod named, as ``hvd.broadcast_optimizer_state`` does."""
        ranks = list(self._process_set.ranks)
        return ranks.index(global_rank) if global_rank in ranks else None

    def _global(self, root: int) -> int:
        """Horovod's ``root_rank`` for this communicator's rank ``root``: Horovod names a
        broadcast's root by its global rank even within a process set (ProcessSet.rank's
        docstring), while ranks here count within the set, as ``self.rank`` does.  Passing the
        set's rank through named the wrong process, or one outside the set, on any set but the
        global one."""
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} outside a world of {self.size}")
        return self._process_set.ranks[root]
