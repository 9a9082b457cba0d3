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

from typing import Dict

import torch

from ..exchange_buffers import ReusedBuffers, store_difference  # noqa: F401  (cser, liec...)
from .base import Algorithm
from .registry import MethodInfo, Paper


class MemSGD(Algorithm):
    """EF-SGD / MEM-SGD; see the module docstring.

    The error update runs in place: p_i is written over e_i, then e_i over p_i, so the worker
    keeps one bucket; the values are those of the formulas above."""
    name = "memsgd"
    info = MethodInfo(
        name="memsgd", label="MEM-SGD / EF-SGD", order=20,
        summary="worker error feedback, compressed uplink, dense downlink",
        paper=Paper("Sparsified SGD with Memory", "Stich, Cordonnier, Jaggi", 2018,
                    "https://arxiv.org/abs/1809.07599", "NeurIPS"))
    compresses_downlink = False
    state_fields = ("worker_error",)
    keeps_worker_sent = False     # C(p_i) is read once, by worker_sent
    worker_residual = "kept"      # e_i ← p_i − C(p_i), p_i in e_i's storage
    worker_adds_gradient_to = "worker_error"  # p_i = g_i + e_i, written over e_i

    def __init__(self, up="none", down=None):
        super().__init__(up, down)
        self.worker_error: Dict[str, torch.Tensor] = {}  # e_i, whole bucket

    def worker_message(self, key, grad):
        error = self.worker_error.get(key)
        if error is None:   # first round: e_i = 0, and p_i already in the error's own storage
            error = self.worker_error[key] = grad.clone()
            return error
        # p_i written over the error, then the error over p_i (worker_sent): no third buffer
        return torch.add(grad, error, out=error)                      # p_i = g_i + e_i

    def worker_sent(self, key, message, sent):
        store_difference(self.worker_error, key, message, sent)         # e_i ← p_i − C(p_i)
