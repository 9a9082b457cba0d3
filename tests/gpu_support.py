"""What the GPU tests (tests/test_gpu_*.py) share: their marks, a region in which any host-device
synchronisation raises, and bit-for-bit comparison.

The GPU tests need a CUDA device and nothing else of the cluster stack (no Horovod, no MPI), so
one machine with one GPU runs all of them (scripts/gpu-check.sh). Without a CUDA device every
one of them is skipped with the reason below.
"""
from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from hvdcomp.comm import WorkerFailed
from hvdcomp.compressors import base as compressor_base

CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False on this machine)"
#: ``pytestmark`` of every GPU test module
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]

_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` (any devices) hold the same dtype, shape and bits: +0 and -0
    differ, a NaN equals the same NaN (``torch.equal`` would say neither)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = _INTEGER_OF_SIZE[a.element_size()]
    a = a.detach().cpu().contiguous().view(as_int)
    return torch.equal(a, b.detach().cpu().contiguous().view(as_int))


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """Where two tensors of the same shape differ first, for a failure message."""
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{a.dtype}{tuple(a.shape)} against {b.dtype}{tuple(b.shape)}"
    differ = (a != b) & ~(a.isnan() & b.isnan()) if a.is_floating_point() else a != b
    where = torch.nonzero(differ).view(-1)
    if not where.numel():
        return "same values, different bits (signed zeros or NaN payloads)"
    i = int(where[0])
    return (f"{where.numel()} of {a.numel()} elements differ; first at {i}: "
            f"{a[i].item()!r} against {b[i].item()!r}")


@contextlib.contextmanager
def no_host_sync():
    """Inside the block, any operation that makes the host wait for the device (``.item()``,
    ``bool(tensor)``, ``torch.equal``, ``nonzero``, a blocking copy either way) raises
    RuntimeError: torch's CUDA sync debug mode at "error". Work queued before the block is
    finished first, so what the block is charged with is its own."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class SyncFreeRegion:
    """:func:`no_host_sync` for the N threads of one simulated world (the mode is global to the
    process): every rank enters together and leaves together, so no rank's ordinary work before
    or after the region (copying results to the host) is charged to it; a rank that fails
    breaks the barrier, so the others fail at once instead of waiting."""

    def __init__(self, ranks: int, timeout: float = 120.0):
        self._barrier = threading.Barrier(ranks, timeout=timeout)

    @contextlib.contextmanager
    def __call__(self, rank: int):
        torch.cuda.synchronize()
        self._wait()
        if rank == 0:
            torch.cuda.set_sync_debug_mode("error")
        self._wait()
        try:
            yield
            self._wait()           # the others may still be inside
        except BaseException:
            self._barrier.abort()
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            # another rank failed: say so as the simulator does, so that rank's own error is
            # the one simulate() reports
            raise WorkerFailed("another simulated rank failed in or around the sync-free "
                               "region") from None


@contextlib.contextmanager
def finite_check(mode: str):
    """Compressors check for NaN/Inf in ``mode`` (``hvdcomp.compressors.base``): "deferred"
    counts on the device, "auto" (the default) also polls a pinned copy without waiting; what
    was counted is raised when the block ends. Also a decorator, which keeps a test's signature
    (pytest still sees its parameters)."""
    old = compressor_base.set_finite_check(mode)
    try:
        yield
    finally:
        compressor_base.set_finite_check(old)
    compressor_base.raise_if_nonfinite()


def deferred_finite_check():
    """:func:`finite_check` in "deferred" mode: nothing is read on the host at any call."""
    return finite_check("deferred")
