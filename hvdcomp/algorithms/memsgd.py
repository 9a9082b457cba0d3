"""MEM-SGD / EF-SGD: worker error feedback, compressed uplink, dense downlink.

Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018 (MEM-SGD), and
Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression
Schemes", ICML 2019 (EF-SGD, Algorithm 2), in the distributed form of the LIEC-SGD code's
``memsgd`` baseline (research notes §1.4). Worker i, round t:

    p_i = g_i + e_i          (e_i: the worker's error memory, zero at the start)
    send C(p_i)
    e_i ← p_i − C(p_i)
    u   = (1/n) Σ_j C(p_j)   (the server sends the average back uncompressed)

The downlink is dense (``compresses_downlink = False``: a ``down`` compressor is refused).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..compressors._wire import allocate
from .base import Algorithm
from .registry import MethodInfo, Paper


class ReusedBuffers:
    """Work buffers of the error-feedback algorithms, one per (bucket, role), kept across rounds.

    On CPU, writing a freshly allocated tensor of a large bucket costs page faults worth several
    copies (docs/benchmarks.md), so the elementwise steps write into buffers kept here instead of
    allocating each round.  Their contents are not state.  Deliberately not a dict attribute:
    :meth:`Algorithm.state_dict` saves every dict of tensors as state."""

    def __init__(self):
        self._buffers: Dict[Tuple[str, str], torch.Tensor] = {}

    def like(self, key: str, role: str, tensor: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous buffer of ``tensor``'s shape, dtype and device."""
        buffer = self._buffers.get((key, role))
        if (buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype
                or buffer.device != tensor.device):
            buffer = allocate(tensor.numel(), tensor.dtype, tensor.device).view(tensor.shape)
            self._buffers[(key, role)] = buffer
        return buffer


def store_difference(store: Dict[str, torch.Tensor], key: str, minuend: torch.Tensor,
                     subtrahend: torch.Tensor) -> torch.Tensor:
    """``store[key] = minuend − subtrahend``, written into the tensor already stored under
    ``key`` when it fits (same values as a fresh subtraction, without the allocation)."""
    target = store.get(key)
    if (target is None or target.shape != minuend.shape or target.dtype != minuend.dtype
            or target.device != minuend.device or not target.is_contiguous()
            or target.data_ptr() in (minuend.data_ptr(), subtrahend.data_ptr())):
        store[key] = minuend - subtrahend
    else:
        torch.sub(minuend, subtrahend, out=target)
    return store[key]


class MemSGD(Algorithm):
    """EF-SGD / MEM-SGD; see the module docstring.

    The error update runs in place (e_i is overwritten, p_i lives in a buffer reused across
    rounds); the values are those of the formulas above."""
    name = "memsgd"
    info = MethodInfo(
        name="memsgd", label="MEM-SGD / EF-SGD", order=20,
        summary="worker error feedback, compressed uplink, dense downlink",
        paper=Paper("Sparsified SGD with Memory", "Stich, Cordonnier, Jaggi", 2018,
                    "https://arxiv.org/abs/1809.07599", "NeurIPS"))
    compresses_downlink = False

    def __init__(self, up="none", down=None):
        super().__init__(up, down)
        self.worker_error: Dict[str, torch.Tensor] = {}  # e_i, whole bucket
        self._buffers = ReusedBuffers()

    def worker_message(self, key, grad):
        error = self.worker_error.get(key)
        if error is None:
            return grad.clone()
        message = self._buffers.like(key, "message", grad)
        return torch.add(grad, error, out=message)                      # p_i = g_i + e_i

    def worker_sent(self, key, message, sent):
        store_difference(self.worker_error, key, message, sent)         # e_i ← p_i − C(p_i)
