"""EF21-PP and EF21-W-PP against plain float64 implementations of the papers' partial participation.

Worker i is in S_t with probability p, drawn from a generator seeded by crc32("seed:t:i") (the
documented shared draw; round 0 is the initialisation, where everyone takes part). The oracles
write the papers' loops with their own top-k and their own draw; the rounds run through the five
steps directly (as tests/test_ef21.py does) and through the exchange on the simulator.
"""
from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path

import pytest
import torch

import multirank
from hvdcomp.algorithms import make_algorithm
from hvdcomp.algorithms.ef21 import EF21
from hvdcomp.algorithms.ef21pp import EF21PP, EF21WPP, participates
from hvdcomp.comm import simulate
from hvdcomp.exchange import Exchange
from oracle import mean, plain_chunks
from test_ef21 import ExactTopK, oracle_topk, quadratic_problem, run_round

F64 = torch.float64
N, D, GAMMA, ROUNDS, K = 4, 12, 0.05, 40, 2
SMOOTHNESS = [1.0, 4.0, 9.0, 30.0]


def in_sample(seed: int, t: int, i: int, p: float) -> bool:
    """The shared draw, written out: u ~ U[0, 1) from generator crc32("seed:t:i"); i ∈ S_t iff
    u < p."""
    if t == 0:
        return True
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{t}:{i}".encode()))
    return torch.rand((), generator=generator, dtype=F64).item() < p


def ef21pp_oracle(grad_fns, x0, p, seed, weights=None):
    """EF21-PP (B&W), or EF21-W-PP with ``weights`` w_i (Error Feedback Reloaded), by our round k:
    round 0 initialises g_i = C(target_i(x^0)) for everyone; round k ≥ 1 moves x^k = x^{k−1} −
    γ g^{k−1} and updates the workers of S_k. target_i = ∇f_i, or ∇f_i/(n w_i) for EF21-W-PP."""
    n = len(grad_fns)
    scale = [1.0] * n if weights is None else [n * w for w in weights]
    x = x0.clone()
    g_i = [oracle_topk(fn(x) / s, K) for fn, s in zip(grad_fns, scale)]
    trajectory, samples = [x.clone()], []
    for k in range(1, ROUNDS):
        g = (sum(g_i) / n) if weights is None else sum(w * gi for w, gi in zip(weights, g_i))
        x = x - GAMMA * g
        trajectory.append(x.clone())
        sample = [i for i in range(n) if in_sample(seed, k, i, p)]
        samples.append(sample)
        for i in sample:   # c_i = C(target_i(x^k) − g_i) for i ∈ S_k; g_i unchanged otherwise
            g_i[i] = g_i[i] + oracle_topk(grad_fns[i](x) / scale[i] - g_i[i], K)
    return trajectory, samples


def run(workers, grad_fns, x0):
    x, trajectory = x0.clone(), [x0.clone()]
    for _ in range(ROUNDS - 1):
        directions = run_round(workers, [fn(x) for fn in grad_fns])
        for direction in directions[1:]:
            assert torch.equal(direction, directions[0]), "workers must apply the same direction"
        x = x - GAMMA * directions[0]
        trajectory.append(x.clone())
    return trajectory


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_ef21pp_matches_the_paper_step_for_step(p):
    grad_fns = quadratic_problem(N, D)
    x0 = torch.linspace(-1, 1, D, dtype=F64)
    workers = [EF21PP(up=ExactTopK(K), participation=p, rank=i, seed=5) for i in range(N)]
    ours = run(workers, grad_fns, x0)
    theirs, samples = ef21pp_oracle(grad_fns, x0, p, seed=5)
    assert any(len(s) < N for s in samples) and any(s for s in samples)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"x differs at step {step}")


def test_ef21wpp_matches_the_paper_step_for_step():
    grad_fns = quadratic_problem(N, D)
    x0 = torch.linspace(-1, 1, D, dtype=F64)
    weights = [s / sum(SMOOTHNESS) for s in SMOOTHNESS]
    workers = [EF21WPP(up=ExactTopK(K), smoothness=SMOOTHNESS, participation=0.5, rank=i, seed=2)
               for i in range(N)]
    ours = run(workers, grad_fns, x0)
    theirs, _ = ef21pp_oracle(grad_fns, x0, 0.5, seed=2, weights=weights)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"x differs at step {step}")


def test_full_participation_is_ef21_and_the_draw_is_shared_and_fair():
    grad_fns = quadratic_problem(N, D)
    x0 = torch.linspace(-1, 1, D, dtype=F64)
    full = run([EF21PP(up=ExactTopK(K), participation=1.0, rank=i) for i in range(N)], grad_fns, x0)
    plain = run([EF21(up=ExactTopK(K)) for _ in range(N)], grad_fns, x0)
    assert all(torch.equal(a, b) for a, b in zip(full, plain))
    # every rank computes the same S_t (a function of seed, round, worker only) ...
    draws = [[participates(7, t, i, 0.25) for i in range(N)] for t in range(1, 2001)]
    assert draws == [[in_sample(7, t, i, 0.25) for i in range(N)] for t in range(1, 2001)]
    # ... and each worker takes part in a fraction p of the rounds (4 σ of a binomial)
    for i in range(N):
        share = sum(row[i] for row in draws) / len(draws)
        assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(draws)), (i, share)
    assert participates(7, 0, 3, 0.01)    # round 0 initialises every worker


@pytest.mark.parametrize("kwargs,message", [
    ({"participation": 0.0, "rank": 0}, "participation must be a probability"),
    ({"participation": 1.5, "rank": 0}, "participation must be a probability"),
    ({"participation": 0.5}, "needs rank"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_algorithm("ef21pp", up="topk:ratio=0.1", **kwargs)


# --- through the exchange on the simulator: the sharded server sees the same mean ---------------

SIM_D, P, SEED = 300, 0.5, 11


def exchange_worker(comm, name):
    grad_fn = quadratic_problem(N, SIM_D)[comm.rank]
    extra = {"smoothness": SMOOTHNESS} if name == "ef21wpp" else {}
    algo = make_algorithm(name, up="topk:ratio=0.05", participation=P, rank=comm.rank,
                          seed=SEED, **extra)
    exchange = Exchange(algo, comm)
    x = torch.linspace(-1, 1, SIM_D, dtype=F64)
    trajectory = [x]
    for _ in range(8):
        x = x - GAMMA * exchange.exchange("weights", grad_fn(x))
        exchange.end_round()
        trajectory.append(x)
    return trajectory


def exchange_oracle(name):
    """EF21-PP / EF21-W-PP with top-k per chunk of the sharded server (fp32 values on the wire)."""
    grad_fns = quadratic_problem(N, SIM_D)
    bounds = plain_chunks(SIM_D, N)

    def topk(v):
        return torch.cat([oracle_topk(v[a:b], math.ceil(round(0.05 * (b - a), 9))).float().double()
                          if b > a else v[a:b] for a, b in bounds])

    weights = [s / sum(SMOOTHNESS) for s in SMOOTHNESS] if name == "ef21wpp" else [1 / N] * N
    x = torch.linspace(-1, 1, SIM_D, dtype=F64)
    g_i = [torch.zeros(SIM_D, dtype=F64) for _ in range(N)]
    g = torch.zeros(SIM_D, dtype=F64)
    trajectory = [x]
    for k in range(8):
        sent = []
        for i in range(N):
            if in_sample(SEED, k, i, P):
                # top-k is positively homogeneous: C(n w_i y)/(n w_i) = C(y) up to rounding
                c = topk(grad_fns[i](x) - N * weights[i] * g_i[i])
                g_i[i] = g_i[i] + c / (N * weights[i])
            else:
                c = torch.zeros(SIM_D, dtype=F64)
            sent.append(c)
        g = g + mean(sent)                     # = Σ_{i∈S} w_i u_i (EF21: w_i = 1/n)
        x = x - GAMMA * g
        trajectory.append(x)
    return trajectory


@pytest.mark.parametrize("name", ["ef21pp", "ef21wpp"])
def test_through_the_exchange_matches_the_paper(name):
    results = simulate(N, exchange_worker, name)
    expected = exchange_oracle(name)
    for rank in range(N):
        for step, (ours, theirs) in enumerate(zip(results[rank], expected)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10,
                                       msg=f"{name} rank {rank} step {step}")


# --- end to end: hvdcomp train on 2 real ranks ----------------------------------------------------

HVDCOMP = Path(sys.executable).parent / "hvdcomp"


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["ef21pp", "ef21wpp"])
def test_trains_digits_on_two_ranks(name, tmp_path):
    multirank.require("mpi")
    if not HVDCOMP.exists():
        pytest.skip(f"{HVDCOMP} missing: install the project (scripts/setup.sh)")
    out = tmp_path / "run"
    argv = [str(HVDCOMP), "train", "--out", str(out), "--quiet", "--algorithm", name,
            "--compressor", "topk:ratio=0.1", "--epochs", "4", "--lr", "0.5",
            "--algorithm-option", "participation=0.5"]
    done = multirank.run_command(multirank.launch_command(2, "mpi", argv), 300)
    assert done.returncode == 0, done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] > 0.85, summary["final_accuracy"]   # chance: 10 %
