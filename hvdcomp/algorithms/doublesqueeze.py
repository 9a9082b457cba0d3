"""DoubleSqueeze: error feedback on the workers and on the server; both directions compressed.

Tang, Yu, Lian, Zhang, Liu, "DoubleSqueeze: Parallel Stochastic Gradient Descent with
Double-Pass Error-Compensated Compression", ICML 2019, Algorithm 1 (worker error δ_i, server
error δ; here ``worker_error`` and ``server_error``). Round t:

    worker i:  p_i = g_i + δ_i ;  send C(p_i) ;  δ_i ← p_i − C(p_i)
    server:    v = (1/n) Σ_j C(p_j) + δ ;  send C(v) ;  δ ← v − C(v)
    worker i:  u = C(v)

On the sharded server each rank holds δ for the chunk of each bucket it owns.
"""
from __future__ import annotations

from typing import Dict

import torch

from .base import Algorithm
from .registry import MethodInfo, Paper
from .memsgd import store_difference


class DoubleSqueeze(Algorithm):
    """DoubleSqueeze; see the module docstring.

    The error updates run in place: p_i is written over δ_i and then δ_i over p_i (the worker
    keeps one bucket), and v = m + δ is added into the mean the exchange hands over (it does not
    read it again); the values are those of the formulas above."""
    name = "doublesqueeze"
    state_fields = ("worker_error", "server_error")
    keeps_worker_sent = False     # C(p_i) is read once, by worker_sent
    worker_residual = "kept"      # δ_i ← p_i − C(p_i), p_i in δ_i's storage
    worker_adds_gradient_to = "worker_error"  # p_i = g_i + δ_i, written over δ_i
    server_residual = True        # δ ← v − C(v), v in δ's storage
    server_adds_mean_to = "server_error"  # v = m + δ, written over δ
    info = MethodInfo(
        name="doublesqueeze", label="DoubleSqueeze", order=30,
        summary="error feedback on the workers and on the server; both directions compressed",
        paper=Paper("DoubleSqueeze: Parallel Stochastic Gradient Descent with Double-Pass "
                    "Error-Compensated Compression", "Tang, Yu, Lian, Zhang, Liu", 2019,
                    "https://arxiv.org/abs/1905.05957", "ICML"))

    def __init__(self, up="none", down=None):
        super().__init__(up, down)
        self.worker_error: Dict[str, torch.Tensor] = {}  # δ_i, whole bucket
        self.server_error: Dict[str, torch.Tensor] = {}  # δ, this rank's chunk

    def worker_message(self, key, grad):
        error = self.worker_error.get(key)
        if error is None:   # first round: δ_i = 0, and p_i already in the error's own storage
            error = self.worker_error[key] = grad.clone()
            return error
        # p_i written over the error, then the error over p_i (worker_sent): no third buffer
        return torch.add(grad, error, out=error)                      # p_i = g_i + δ_i

    def worker_sent(self, key, message, sent):
        store_difference(self.worker_error, key, message, sent)         # δ_i ← p_i − C(p_i)

    def server_message(self, key, mean_received):
        # v written over the error (then the error over v in server_sent), so the exchange can
        # put C(v) over the mean: the server keeps no buffer beyond its error
        error = self.server_error.get(key)
        if error is None:                            # first round: δ = 0
            error = self.server_error[key] = mean_received.clone()
            return error
        return error.add_(mean_received)                                 # v = m + δ

    def server_sent(self, key, message, sent):
        store_difference(self.server_error, key, message, sent)         # δ ← v − C(v)
