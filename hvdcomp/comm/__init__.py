"""Communicators: one small interface over collectives (:mod:`.base`), implemented over Horovod
(:mod:`.horovod`) and by an in-process simulator of N workers (:mod:`.simulator`)."""
from .base import Communicator, Handle
from .simulator import SimCommunicator, SimWorld, WorkerFailed, simulate


def HorovodCommunicator(*args, **kwargs):
    """Build :class:`hvdcomp.comm.horovod.HorovodCommunicator` (imported lazily, so that
    ``hvdcomp.comm`` works where Horovod is not installed)."""
    from .horovod import HorovodCommunicator as _Horovod
    return _Horovod(*args, **kwargs)


__all__ = ["Communicator", "Handle", "HorovodCommunicator", "SimCommunicator", "SimWorld",
           "WorkerFailed", "simulate"]
