"""MoNNA's baselines: Krum, the geometric median (RFA), centered clipping, and the mimic attack.

Each rule is checked by hand and against a plain float64 re-computation written from its paper
(loops over pairs and workers, no code under test); the MoNNA driver with each rule is compared
step for step with the paper's update on the simulator; robustness is measured there (sign
flipping: the rules learn where averaging collapses); and ``hvdcomp train`` runs one of them
with the mimic attack on 3 real ranks.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import multirank
from hvdcomp.comm import simulate
from hvdcomp.robust import (MoNNA, aggregate, attack_vectors, centered_clip, geometric_median,
                            krum, mimic)
from test_monna import F, N, TARGETS, initial_params, set_gradients

F64 = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=F64)


def cloud(seed=0, n=7, d=5):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- the papers' rules, written out ---------------------------------------------------------------

def krum_oracle(vectors, f):
    """Blanchard et al. 2017: score(i) = Σ of the n − f − 2 smallest ‖V_i − V_j‖², j ≠ i."""
    n = len(vectors)
    scores = []
    for i in range(n):
        squared = sorted(float(((vectors[i] - vectors[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(squared[:n - f - 2]))
    return vectors[scores.index(min(scores))]


def weiszfeld_oracle(vectors, nu=1e-5, iterations=4, ftol=1e-6):
    """Pillutla et al.'s smoothed Weiszfeld, as their code runs it (start at the mean)."""
    n = len(vectors)
    alphas = [1.0 / n] * n

    def objective(z):
        return sum(a * float(torch.linalg.vector_norm(z - v)) for a, v in zip(alphas, vectors))

    z = sum(a * v for a, v in zip(alphas, vectors))
    value = objective(z)
    for _ in range(iterations):
        betas = [a / max(nu, float(torch.linalg.vector_norm(z - v)))
                 for a, v in zip(alphas, vectors)]
        z = sum(b * v for b, v in zip(betas, vectors)) / sum(betas)
        previous, value = value, objective(z)
        if abs(previous - value) < ftol * value:
            break
    return z


def cclip_oracle(vectors, centre, radius, iterations):
    """Karimireddy et al. 2021: v ← v + (1/n) Σ_i (V_i − v)·min(1, τ/‖V_i − v‖), L times."""
    v = centre.clone()
    for _ in range(iterations):
        step = torch.zeros_like(v)
        for x in vectors:
            norm = float(torch.linalg.vector_norm(x - v))
            step = step + (x - v) * (min(1.0, radius / norm) if norm > 0 else 1.0)
        v = v + step / len(vectors)
    return v


# --- by hand and against the oracles ------------------------------------------------------------

def test_krum_by_hand_and_against_the_paper():
    # four clustered points and one far away; f = 1, n − f − 2 = 2 neighbours scored
    points = t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [50.0, 50.0]])
    # scores: each corner's two nearest are at distance 1 → score 2 for every corner; ties: lowest
    assert krum(points, 1).tolist() == [0.0, 0.0]
    assert aggregate("krum", points, 1).tolist() == [0.0, 0.0]
    for seed in range(5):
        vectors = cloud(seed)
        for f in (0, 1, 2):
            assert torch.equal(krum(vectors, f), krum_oracle(list(vectors), f))
    with pytest.raises(ValueError, match="n > 2f \\+ 2"):
        krum(points, 2)


def test_geometric_median_against_the_paper_and_its_definition():
    for seed in range(5):
        vectors = cloud(seed)
        torch.testing.assert_close(geometric_median(vectors), weiszfeld_oracle(list(vectors)),
                                   rtol=0, atol=1e-12)
    # run long enough it reaches the geometric median: no nearby point has a smaller Σ‖z − V_i‖
    vectors = cloud(7, n=9, d=3)
    z = geometric_median(vectors, iterations=500, ftol=0.0, nu=1e-12)

    def total(p):
        return float(torch.linalg.vector_norm(vectors - p, dim=1).sum())
    for direction in torch.eye(3, dtype=F64):
        for step in (1e-3, -1e-3):
            assert total(z + step * direction) >= total(z)
    # robust: moving one of nine points far away moves the mean by ~2e5, the median little (its
    # default 4 iterations from the mean get 1000× closer; iterated on, it stays near the cloud)
    moved = vectors.clone()
    moved[0] += 1e6

    def shift(rule):
        return float(torch.linalg.vector_norm(rule(moved) - rule(vectors)))
    assert shift(geometric_median) < 1e-3 * shift(lambda v: v.mean(0))
    assert shift(lambda v: geometric_median(v, iterations=100, ftol=0.0)) < 5
    assert aggregate("rfa", vectors, 0, nu=1e-3, iterations=2).shape == (3,)


def test_centered_clipping_against_the_paper():
    vectors = cloud(3)
    for radius, iterations in ((0.5, 3), (2.0, 1), (0.1, 5)):
        for centre in (vectors[0], torch.zeros(5, dtype=F64)):
            ours = centered_clip(vectors, 1, pivot=centre, radius=radius, iterations=iterations)
            theirs = cclip_oracle(list(vectors), centre, radius, iterations)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    # a radius larger than every offset: one step lands on the mean
    torch.testing.assert_close(centered_clip(vectors, 1, pivot=vectors[0], radius=1e9,
                                             iterations=1), vectors.mean(0), rtol=0, atol=1e-12)
    # one outlier moves the centre by at most radius/n per iteration
    outlier = torch.cat([torch.zeros(6, 2, dtype=F64), t([[1e6, 0.0]])])
    assert float(torch.linalg.vector_norm(
        centered_clip(outlier, 1, pivot=torch.zeros(2, dtype=F64), radius=1.0))) <= 3 / 7 + 1e-12


@pytest.mark.parametrize("name,options,message", [
    ("cclip", {}, "needs the pivot"),
    ("cclip", {"radius": -1.0}, "radius"),
    ("rfa", {"iterations": 0}, "iterations"),
    ("nna", {"radius": 1.0}, "has no option"),
    ("krum", {"nu": 1.0}, "has no option"),
])
def test_bad_aggregator_options_are_refused(name, options, message):
    pivot = None if name == "cclip" and not options else t([0.0, 0.0])
    with pytest.raises(ValueError, match=message):
        aggregate(name, cloud(1, d=2), 1, pivot=pivot, **options)


def test_mimic_copies_one_honest_worker():
    honest = t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert mimic(honest).tolist() == [1.0, 2.0]
    assert attack_vectors("mimic", honest, 2).tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert attack_vectors("mimic", honest, 2, param=2).tolist() == [[5.0, 6.0]] * 2
    with pytest.raises(ValueError, match="index in \\[0, 3\\)"):
        attack_vectors("mimic", honest, 1, param=3)


# --- the MoNNA driver with each rule, on the simulator --------------------------------------------

RULES = {"krum": {}, "rfa": {}, "cclip": {"radius": 0.5}}


def driver_worker(comm, steps, lr, beta, aggregator, attack, options, f=F):
    params = initial_params()
    driver = MoNNA(params, comm, lr=lr, beta=beta, f=f, aggregator=aggregator, attack=attack,
                   simulate_faults=True, aggregator_options=options)
    for _ in range(steps):
        set_gradients(params, comm.rank)
        driver.step()
    return torch.cat([p.detach().reshape(-1) for p in params]), driver.describe()


def rule_oracle(aggregator, vectors, f, pivot, options):
    if aggregator == "krum":
        return krum_oracle(list(vectors), f)
    if aggregator == "rfa":
        return weiszfeld_oracle(list(vectors))
    return cclip_oracle(list(vectors), pivot, options["radius"], 3)


def driver_oracle(steps, lr, beta, aggregator, attack, options):
    """MoNNA's step (momentum, half-step, mixing) with the rule written out; faulty ranks last."""
    theta = [torch.full((16,), 0.5, dtype=F64) for _ in range(N)]
    m = [torch.zeros(16, dtype=F64) for _ in range(N)]
    honest_ids = list(range(N - F))
    for _ in range(steps):
        half = []
        for r in range(N):
            m[r] = beta * m[r] + (1 - beta) * (theta[r] - TARGETS[r])
            half.append(theta[r] - lr * m[r])
        honest = torch.stack([half[r] for r in honest_ids])
        bad = (-honest.mean(0) if attack == "sign_flip" else honest[0]).expand(F, -1)
        received = torch.cat([honest, bad])
        for r in honest_ids:
            theta[r] = rule_oracle(aggregator, received, F, half[r], options)
        for r in range(N - F, N):
            theta[r] = honest.mean(0)
    return theta


@pytest.mark.parametrize("aggregator", sorted(RULES))
@pytest.mark.parametrize("attack", ["sign_flip", "mimic"])
def test_driver_with_each_rule_matches_the_papers_update(aggregator, attack):
    results = simulate(N, driver_worker, 4, 0.3, 0.9, aggregator, attack, RULES[aggregator])
    expected = driver_oracle(4, 0.3, 0.9, aggregator, attack, RULES[aggregator])
    for rank in range(N - F):
        torch.testing.assert_close(results[rank][0], expected[rank], rtol=0, atol=1e-10,
                                   msg=f"{aggregator}/{attack} rank {rank}")
    assert results[0][1]["aggregator"] == aggregator
    if RULES[aggregator]:
        assert results[0][1]["aggregator_options"] == RULES[aggregator]


def honest_error(aggregator, attack="sign_flip", steps=150):
    """Mean over honest ranks of ‖θ_r − θ*‖/‖θ*‖, θ* the honest optimum (mean of honest targets)."""
    results = simulate(N, driver_worker, steps, 0.3, 0.5, aggregator, attack, {})
    optimum = torch.stack(TARGETS[:N - F]).mean(0)
    errors = [float(torch.linalg.vector_norm(results[r][0] - optimum)) for r in range(N - F)]
    return sum(errors) / len(errors) / float(torch.linalg.vector_norm(optimum))


def test_under_sign_flipping_baselines_beat_averaging_and_nna_beats_them():
    """MoNNA's claim, small: ½‖θ − c_r‖² per rank (heterogeneous targets), f = 2 of 8 send
    −mean(honest). Averaging is pulled 77 % of the way to 0; the baselines hold better (at their
    reference settings: cclip τ = 2, rfa 4 Weiszfeld steps), and NNA, which drops exactly the f
    farthest models, reaches the honest optimum. Measured: krum 0.13, cclip 0.29, rfa 0.50."""
    averaging = honest_error("mean")
    assert averaging > 0.7
    monna = honest_error("nna")
    assert monna < 1e-6
    for aggregator in ("krum", "rfa", "cclip"):
        error = honest_error(aggregator)
        assert monna < error < 0.7 * averaging, (aggregator, error, averaging)


def test_mimic_biases_averaging_towards_the_copied_worker():
    """Mimic over-weights honest worker 0: the averaged consensus moves from the honest optimum
    towards worker 0's target (with f = 2 of 8 copies: (Σ_h c_h + 2 c_0)/8)."""
    results = simulate(N, driver_worker, 200, 0.3, 0.5, "mean", "mimic", {})
    optimum = torch.stack(TARGETS[:N - F]).mean(0)
    biased = (torch.stack(TARGETS[:N - F]).sum(0) + F * TARGETS[0]) / N
    for rank in range(N - F):
        assert float(torch.linalg.vector_norm(results[rank][0] - biased)) < 1e-6 * float(
            torch.linalg.vector_norm(biased))
        assert float(torch.linalg.vector_norm(results[rank][0] - optimum)) > 0.1


def test_driver_refuses_bad_rule_options_up_front():
    from hvdcomp.comm import SimCommunicator, SimWorld
    comm = SimCommunicator(SimWorld(4), 0)
    with pytest.raises(ValueError, match="n > 2f \\+ 2"):
        MoNNA(initial_params(), comm, lr=0.1, f=1, aggregator="krum")
    with pytest.raises(ValueError, match="has no option"):
        MoNNA(initial_params(), comm, lr=0.1, aggregator="nna", aggregator_options={"radius": 1})
    with pytest.raises(ValueError, match="mimic: attack_param is the honest worker"):
        MoNNA(initial_params(), comm, lr=0.1, f=1, attack="mimic", attack_param=3,
              simulate_faults=True)


def test_compression_factories_build_the_new_algorithms():
    from hvdcomp.compression import Compression
    assert Compression.neolithic(rounds=3).build().config() == {
        "algorithm": "neolithic", "up": "sign", "down": "sign", "rounds": 3}
    assert Compression.cser(period=4).build().config()["period"] == 4
    built = Compression.ef21pp(rank=1, participation=0.25).build()
    assert (built.rank, built.participation) == (1, 0.25)


# --- end to end: hvdcomp train on 3 real ranks ----------------------------------------------------

HVDCOMP = Path(sys.executable).parent / "hvdcomp"


@pytest.mark.mpi
def test_train_monna_with_centered_clipping_under_mimic_on_three_ranks(tmp_path):
    multirank.require("mpi")
    if not HVDCOMP.exists():
        pytest.skip(f"{HVDCOMP} missing: install the project (scripts/setup.sh)")
    out = tmp_path / "run"
    options = ["f=1", "attack=mimic", "aggregator=cclip", "radius=1.0", "beta=0.9"]
    argv = [str(HVDCOMP), "train", "--out", str(out), "--quiet", "--algorithm", "monna",
            "--epochs", "6", "--lr", "0.5", "--schedule", "constant"]
    for option in options:
        argv += ["--algorithm-option", option]
    done = multirank.run_command(multirank.launch_command(3, "mpi", argv), 300)
    assert done.returncode == 0, done.stdout
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["faulty_ranks"] == [2] and summary["attack"] == "mimic"
    assert config["aggregator"] == "cclip" and config["aggregator_options"] == {"radius": 1.0}
    assert summary["final_accuracy"] > 0.8, summary["final_accuracy"]    # chance: 10 %

    bad = tmp_path / "bad"
    argv = [str(HVDCOMP), "train", "--out", str(bad), "--quiet", "--algorithm", "monna",
            "--algorithm-option", "aggregator=nna", "--algorithm-option", "radius=1.0"]
    done = multirank.run_command(multirank.launch_command(2, "mpi", argv), 120)
    assert done.returncode == 2 and "has no option(s) radius" in done.stdout, done.stdout
    assert math.isfinite(summary["final_accuracy"])
