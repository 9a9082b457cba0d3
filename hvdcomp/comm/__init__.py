"""Communicators: one small interface over collectives (:mod:`.base`), implemented over Horovod
(:mod:`.horovod`, which imports ``horovod.torch`` only when constructed) and by an in-process
simulator of N workers (:mod:`.simulator`)."""
from .base import Communicator, Handle
from .horovod import HorovodCommunicator
from .simulator import SimCommunicator, SimWorld, WorkerFailed, simulate

__all__ = ["Communicator", "Handle", "HorovodCommunicator", "SimCommunicator", "SimWorld",
           "WorkerFailed", "simulate"]
