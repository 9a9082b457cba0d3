"""MEM-SGD / EF-SGD: worker error feedback, compressed uplink, dense downlink.

Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018 (MEM-SGD), and
Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression
Schemes", ICML 2019 (EF-SGD, Algorithm 2), in the distributed form of the LIEC-SGD code's
``memsgd`` baseline (research notes §1.4). Worker i, round t:

    p_i = g_i + e_i          (e_i: the worker's error memory, zero at the start)
    send C(p_i)
    e_i ← p_i − C(p_i)
    u   = (1/n) Σ_j C(p_j)   (the server sends the average back uncompressed)

The downlink is dense whatever ``down`` says (``compresses_downlink = False``).
"""
from __future__ import annotations

from typing import Dict

import torch

from .base import Algorithm


class MemSGD(Algorithm):
    """EF-SGD / MEM-SGD; see the module docstring."""
    name = "memsgd"
    compresses_downlink = False

    def __init__(self, up="none", down=None):
        super().__init__(up, down)
        self.worker_error: Dict[str, torch.Tensor] = {}  # e_i, whole bucket

    def worker_message(self, key, grad):
        error = self.worker_error.get(key)
        return grad.clone() if error is None else grad + error          # p_i = g_i + e_i

    def worker_sent(self, key, message, sent):
        self.worker_error[key] = message - sent                         # e_i ← p_i − C(p_i)
