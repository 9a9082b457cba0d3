"""Threads per rank: ranks on one node share its cores.

torch starts as many intra-op threads as the node has cores in every rank; N ranks on one node
then run N times that many threads, and GNU OpenMP's workers (torch's, and the compressors' C
kernels on the same pool) spin for milliseconds after each parallel region, taking cores from
the other ranks.  ``hvdcomp train`` and ``hvdcomp bench comm`` therefore give each rank its share
of the cores, unless the user chose with ``OMP_NUM_THREADS``."""
from __future__ import annotations

import os

import torch


def share_cores(local_size: int) -> int:
    """Set torch's intra-op threads to cores // ``local_size`` (at least 1) unless
    ``OMP_NUM_THREADS`` is set; returns the threads in force."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_size)))
    return torch.get_num_threads()
