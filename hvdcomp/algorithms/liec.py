"""LIEC-SGD: local immediate error compensation, one persistent error on the server.

Cheng, Shen, Xu, Qian, Wu, Zhou, Zhang, Tao, Chen, "Communication-Efficient Distributed Learning
with Local Immediate Error Compensation", arXiv 2402.11857 (2024); update rules as in the
authors' code (github.com/chengyif/LIEC-SGD, ``main.py``, method ``liec``; research notes §1.2).
Round t, unless (t+1) mod p = 0:

    worker i:  send C(g_i) ;  r_i = g_i − C(g_i)        (local immediate error, this round only)
    server:    v = (1/n) Σ_j C(g_j) + e ;  send C(v) ;  e ← v − C(v)
    worker i:  d_i = C(v) + r_i                          (the error is compensated immediately)

Synchronisation round, (t+1) mod p = 0 (``is_sync_step()``): the optimizer first averages the
parameters exactly, then the exchange returns d = (1/n) Σ_j g_j + e for every bucket and sets
e ← 0; nothing is compressed.  A bucket's gradient is averaged in place in its buffer by an
allreduce launched at ``start``, its parameters in place by one allreduce each at ``finish``
(:mod:`hvdcomp.exchange_sync`); each rank adds its chunk of e to its chunk of the average and
broadcasts that chunk of d in place.

Averaging over workers gives the "virtual average" view x̄⁺ = x̄ − η(ḡ + eᵗ − eᵗ⁺¹): error
feedback with the error kept only on the server. Weight decay stays out of g (the optimizer adds
it after the exchange), as in the authors' code.
"""
from __future__ import annotations

from typing import Dict

import torch

from .base import Algorithm
from .registry import MethodInfo, Option, Paper
from .memsgd import store_difference


class LIEC(Algorithm):
    """LIEC-SGD with averaging period ``period`` (the paper's p; 32 and 100 in its README)."""
    name = "liec"
    state_fields = ("server_error",)      # r_i lives one round only
    worker_residual = "compensated"       # r_i = g_i − C(g_i), d_i = C(v) + r_i
    server_residual = True                # e ← v − C(v), v in e's storage
    server_adds_mean_to = "server_error"  # v = m + e, written over e
    info = MethodInfo(
        name="liec", label="LIEC-SGD", order=40,
        summary="local immediate error compensation, a server error, exact averaging every "
                "period rounds",
        paper=Paper("Communication-Efficient Distributed Learning with Local Immediate Error "
                    "Compensation", "Cheng, Shen, Xu, Qian, Wu, Zhou, Zhang, Tao, Chen", 2024,
                    "https://arxiv.org/abs/2402.11857", "arXiv"),
        options=(Option("period", "int", 32, "an integer >= 1",
                        "rounds between exact averagings (hvdcomp train: --period)"),))

    @classmethod
    def train_options(cls, cfg, world_size, rank, steps_per_epoch):
        options = dict(cfg.algorithm_options)
        options.setdefault("period", cfg.period)       # train's --period
        return options

    def __init__(self, up="none", down=None, period: int = 32):
        super().__init__(up, down)
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"liec: period must be a positive integer (rounds between exact "
                             f"averagings), not {period!r}")
        self.period = period
        self.local_error: Dict[str, torch.Tensor] = {}   # r_i, whole bucket, this round only
        self.server_error: Dict[str, torch.Tensor] = {}  # e, this rank's chunk, persistent

    def hyperparameters(self):
        return {"period": self.period}

    def is_sync_step(self) -> bool:
        return (self.step + 1) % self.period == 0

    def worker_sent(self, key, message, sent):
        # r_i is written over C(g_i): the exchange's buffer is the algorithm's until
        # worker_update (hvdcomp.exchange, "Buffers"), so r_i takes no memory of its own
        self.local_error[key] = torch.sub(message, sent, out=sent)  # r_i = g_i − C(g_i)

    def server_message(self, key, mean_received):
        # v written over the error (then the error over v in server_sent), so the exchange can
        # put C(v) over the mean: the server keeps no buffer beyond its error
        error = self.server_error.get(key)
        if error is None:                            # first round: e = 0
            error = self.server_error[key] = mean_received.clone()
            return error
        return error.add_(mean_received)                                 # v = m + e

    def server_sent(self, key, message, sent):
        store_difference(self.server_error, key, message, sent)         # e ← v − C(v)

    def worker_update(self, key, received):
        return received.add_(self.local_error.pop(key))                 # d_i = C(v) + r_i

    def server_flush(self, key):
        return self.server_error.pop(key, None)                         # e folded in, e ← 0

    def sync_update(self, key, mean_grad, flushed):
        # mean_grad is the exact round's own allreduce result (hvdcomp.exchange_sync): adding in
        # place gives mean_grad + flushed without a fresh bucket-sized tensor
        return mean_grad.add_(flushed)                                  # d = ḡ + e
