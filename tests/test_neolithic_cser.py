"""NEOLITHIC and CSER (LIEC-SGD's baselines) against float64 re-computations of their papers' rules.

The oracles below are written from the update equations (research notes §1.4; the modules'
docstrings) with their own top-k, and never call the algorithms under test: NEOLITHIC as
DoubleSqueeze whose messages are compressed in R rounds (vʳ = vʳ⁻¹ + C(x − vʳ⁻¹)), CSER as local
models x_i with a compressed mean, the local residual applied at once and an exact error reset
every H rounds. The rounds run through the real exchange on the in-process simulator (sharded
two-phase server, 4 ranks), and once through ``hvdcomp train`` on 2 real ranks.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import multirank
from hvdcomp.algorithms import make_algorithm
from hvdcomp.algorithms.neolithic import MultiRound
from hvdcomp.comm import simulate
from hvdcomp.compressors import from_spec
from hvdcomp.exchange import Exchange
from oracle import mean, plain_chunks, run_exchange

F64 = torch.float64
N, D, STEPS = 4, 300, 7


def oracle_topk(v: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the ceil(ratio·d) largest |v_j|, rounded to fp32 as top-k's wire carries them."""
    k = min(v.numel(), max(1, math.ceil(round(ratio * v.numel(), 9))))
    out = torch.zeros_like(v)
    index = torch.argsort(v.abs(), descending=True, stable=True)[:k]
    out[index] = v[index].float().double()
    return out


def chunked(ratio: float, bounds):
    """Top-k on each chunk of the sharded server (the exchange compresses chunk by chunk)."""
    return lambda v: torch.cat([oracle_topk(v[a:b], ratio) if b > a else v[a:b]
                                for a, b in bounds])


def fcc(x: torch.Tensor, compress, rounds: int) -> torch.Tensor:
    """Multi-round compression: v⁰ = 0, vʳ = vʳ⁻¹ + C(x − vʳ⁻¹)."""
    v = torch.zeros_like(x)
    for _ in range(rounds):
        v = v + compress(x - v)
    return v


def fp32_gradients(seed: int):
    """Gaussian gradients rounded to fp32 values (top-k's wire is then exact on the first round)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(STEPS, N, D, generator=generator, dtype=F64).float().double()


# --- NEOLITHIC ------------------------------------------------------------------------------------

def neolithic_oracle(grads, c_up, c_down, rounds):
    d = grads.shape[2]
    worker_error = [torch.zeros(d, dtype=F64) for _ in range(N)]
    server_error = torch.zeros(d, dtype=F64)
    updates = []
    for t in range(grads.shape[0]):
        p = [grads[t, i] + worker_error[i] for i in range(N)]     # p_i = g_i + e_i
        c = [fcc(pi, c_up, rounds) for pi in p]                   # C_R(p_i)
        worker_error = [pi - ci for pi, ci in zip(p, c)]          # e_i = p_i − C_R(p_i)
        v = mean(c) + server_error                                # v = mean C_R(p_j) + e
        u = fcc(v, c_down, rounds)
        server_error = v - u                                      # e = v − C_R(v)
        updates.append(u)
    return torch.stack(updates)


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_neolithic_matches_the_multi_round_oracle(rounds):
    grads = fp32_gradients(seed=3)
    results = simulate(N, run_exchange, "neolithic", grads, "topk:ratio=0.05", "topk:ratio=0.1",
                       "two_phase", {"rounds": rounds}, 1)
    bounds = plain_chunks(D, N)      # one bucket, sharded over the N ranks
    expected = neolithic_oracle(grads, chunked(0.05, bounds), chunked(0.1, bounds), rounds)
    for rank in range(N):
        torch.testing.assert_close(results[rank]["updates"], expected, rtol=0, atol=1e-12,
                                   msg=f"rank {rank}")
    # R rounds: R payloads of top-k each way (bytes as in the exchange's convention)
    k = [min(b - a, max(1, math.ceil(round(0.05 * (b - a), 9)))) for a, b in bounds]
    # (chunks of at most 256 elements: fp32 value + uint8 index)
    assert results[0]["bytes_up"] == STEPS * rounds * sum(kj * (4 + 1) for kj in k[1:])


def test_multi_round_payload_is_r_payloads_and_contracts_more():
    x = torch.randn(1000, dtype=F64, generator=torch.Generator().manual_seed(0))
    sign = from_spec("sign")
    errors = []
    for rounds in (1, 2, 3):
        c_r = MultiRound(sign, rounds)
        payload, decoded = c_r.roundtrip(x)
        assert payload.numel() == c_r.payload_nbytes(1000, F64) == rounds * (4 + 125)
        assert torch.equal(c_r.decompress(payload, 1000, F64), decoded)
        # written out: each round compresses what the previous rounds left
        v = torch.zeros_like(x)
        for _ in range(rounds):
            v = v + sign.roundtrip((x - v).contiguous())[1]
        assert torch.equal(decoded, v)
        errors.append(torch.linalg.vector_norm(x - decoded).item())
    assert errors[0] > errors[1] > errors[2]
    algo = make_algorithm("neolithic", up="sign", rounds=2)
    assert algo.config() == {"algorithm": "neolithic", "up": "sign", "down": "sign", "rounds": 2}
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        make_algorithm("neolithic", up="sign", rounds=0)


# --- CSER -----------------------------------------------------------------------------------------

PERIOD, GAMMA = 3, 0.1


def quadratic_gradients():
    """∇f_i(x) = A_i x − b_i, different per worker (the models bifurcate between resets)."""
    generator = torch.Generator().manual_seed(1)
    mats, vecs = [], []
    for i in range(N):
        q = torch.randn(D, D, generator=generator, dtype=F64)
        mats.append(q @ q.T / D + (i + 1) * torch.eye(D, dtype=F64))
        vecs.append(torch.randn(D, generator=generator, dtype=F64) * (i + 1))
    return [lambda x, a=a, b=b: a @ x - b for a, b in zip(mats, vecs)]


def cser_oracle(compress, steps):
    """The paper's CSER with C₂ = identity, in model units: x_i and ê_i per worker."""
    grad_fns = quadratic_gradients()
    x = [torch.linspace(-1, 1, D, dtype=F64) for _ in range(N)]
    e = [torch.zeros(D, dtype=F64) for _ in range(N)]
    for t in range(steps):
        g = [fn(xi) for fn, xi in zip(grad_fns, x)]
        c = [compress(gi) for gi in g]
        r = [gi - ci for gi, ci in zip(g, c)]
        m = mean(c)
        x = [xi - GAMMA * (m + ri) for xi, ri in zip(x, r)]        # partial synchronisation
        e = [ei - GAMMA * ri for ei, ri in zip(e, r)]             # local residual error
        if (t + 1) % PERIOD == 0:                                 # error reset, C₂ = identity
            reset = mean(e)
            x = [xi - ei + reset for xi, ei in zip(x, e)]
            e = [torch.zeros(D, dtype=F64) for _ in range(N)]
    return x


def cser_worker(comm, up, steps):
    """One rank as the optimizer drives it: exact parameter average in sync rounds, then x − γu."""
    grad_fn = quadratic_gradients()[comm.rank]
    exchange = Exchange(make_algorithm("cser", up=up, period=PERIOD), comm)
    x = torch.linspace(-1, 1, D, dtype=F64)
    for _ in range(steps):
        g = grad_fn(x)
        if exchange.is_sync_step():
            exchange.average_parameters([x])
        x = x - GAMMA * exchange.exchange("weights", g)
        exchange.end_round()
    return x


@pytest.mark.parametrize("steps", [2, 3, 7])
def test_cser_matches_the_papers_local_models_and_reset(steps):
    up = "topk:ratio=0.05"
    results = simulate(N, cser_worker, up, steps)
    expected = cser_oracle(chunked(0.05, plain_chunks(D, N)), steps)
    for rank in range(N):
        torch.testing.assert_close(results[rank], expected[rank], rtol=0, atol=1e-10,
                                   msg=f"rank {rank} after {steps} steps")
    differ = any(not torch.allclose(results[0], results[r]) for r in range(1, N))
    assert differ == (steps % PERIOD != 0), "models bifurcate between resets and agree after one"


def test_cser_downlink_is_dense_and_period_is_checked():
    algo = make_algorithm("cser", up="sign", period=8)
    assert algo.down.spec() == "none" and algo.config()["period"] == 8
    with pytest.raises(ValueError, match="sends its downlink dense"):
        make_algorithm("cser", up="sign", down="sign", period=8)
    assert [make_algorithm("cser", period=4).is_sync_step()] == [False]
    with pytest.raises(ValueError, match="period must be a positive integer"):
        make_algorithm("cser", period=0)


# --- end to end: hvdcomp train on 2 real ranks ----------------------------------------------------

HVDCOMP = Path(sys.executable).parent / "hvdcomp"


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm,extra", [("neolithic", []),
                                             ("cser", ["--algorithm-option", "period=8"])])
def test_trains_digits_on_two_ranks(algorithm, extra, tmp_path):
    multirank.require("mpi")
    if not HVDCOMP.exists():
        pytest.skip(f"{HVDCOMP} missing: install the project (scripts/setup.sh)")
    out = tmp_path / "run"
    argv = [str(HVDCOMP), "train", "--out", str(out), "--quiet", "--algorithm", algorithm,
            "--compressor", "sign", "--epochs", "4", "--lr", "0.5", *extra]
    done = multirank.run_command(multirank.launch_command(2, "mpi", argv), 300)
    assert done.returncode == 0, done.stdout
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == algorithm and config["momentum"] == 0.0
    assert summary["final_accuracy"] > 0.85, summary["final_accuracy"]   # chance: 10 %
    assert summary["compression_ratio"] > 1
