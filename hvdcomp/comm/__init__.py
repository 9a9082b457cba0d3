"""Communicators: one small interface over collectives (:mod:`.base`), implemented over Horovod
(:mod:`.horovod`, which imports ``horovod.torch`` only when constructed), over
``torch.distributed`` (:mod:`.torchdist`: Gloo, NCCL, MPI process groups; ranks pair collectives
by launch order there) and by an in-process simulator of N workers (:mod:`.simulator`)."""
from .base import Communicator, Handle
from .horovod import HorovodCommunicator
from .simulator import SimCommunicator, SimWorld, WorkerFailed, simulate
from .torchdist import CollectiveOrderError, TorchDistCommunicator

__all__ = ["CollectiveOrderError", "Communicator", "Handle", "HorovodCommunicator",
           "SimCommunicator", "SimWorld", "TorchDistCommunicator", "WorkerFailed", "simulate"]
