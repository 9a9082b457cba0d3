"""The exchange over torch.distributed's NCCL backend, one rank on one GPU (marker ``gpu``; skipped
without CUDA; scripts/gpu-check.sh runs it): every algorithm's rounds through
:class:`hvdcomp.comm.torchdist.TorchDistCommunicator` give the updates the in-process simulator
gives on the same GPU, bit for bit (one rank: the same kernels on the same data, the collectives
only move bytes). The rank runs in its own process (tests/torchranks.py), so a hung NCCL start
is killed by a timeout instead of stalling the other GPU tests. Collectives across several real
ranks: tests/test_comm_torchdist.py (Gloo; its NCCL single-rank test is marked gpu too)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from gpu_support import GPU_MARKS, first_difference, same_bits

pytestmark = GPU_MARKS + [pytest.mark.skipif(
    importlib.util.find_spec("hvdcomp.comm.torchdist") is None,
    reason="hvdcomp.comm.torchdist is not in this tree")]

CASES = [("psgd", "sign", "sign"), ("liec", "sign", "topk:ratio=0.2"),
         ("doublesqueeze", "topk:ratio=0.1", "topk:ratio=0.1"), ("memsgd", "sign", None),
         ("ef21", "topk:ratio=0.1", None), ("dgc", "dgc:ratio=0.05", None)]
STEPS, D = 3, 5000


def _updates(comm, name, up, down, device):
    from hvdcomp.algorithms import make_algorithm
    from hvdcomp.exchange import Exchange
    from oracle import gradients

    hyper = {"period": 2} if name == "liec" else {"warmup_epochs": 0} if name == "dgc" else {}
    exchange = Exchange(make_algorithm(name, up=up, down=down, **hyper), comm)
    grads = gradients(seed=41, steps=STEPS, n=1, d=D).float().to(device)
    exchange.prepare({"b": (D, torch.float32)})
    updates = []
    for t in range(STEPS):
        updates.append(exchange.exchange("b", grads[t, 0]).to("cpu", copy=True))
        exchange.end_round()
    return torch.stack(updates)


def _on_nccl(cases):
    """Runs in the NCCL rank's process (tests/torchranks.py)."""
    from hvdcomp.comm.torchdist import TorchDistCommunicator
    comm = TorchDistCommunicator()
    return {case: _updates(comm, *case, "cuda") for case in cases}


def test_rounds_over_one_nccl_rank_equal_the_simulators():
    from hvdcomp.comm import simulate
    from torchranks import run_torch_ranks

    on_nccl = run_torch_ranks(_on_nccl, np=1, backend="nccl", timeout=120, cases=CASES)[0]
    for case in CASES:
        simulated = simulate(1, _updates, *case, "cuda")[0]
        assert same_bits(on_nccl[case], simulated), (
            f"{case}: {first_difference(on_nccl[case], simulated)}")
