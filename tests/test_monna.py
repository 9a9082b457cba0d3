"""MoNNA, its aggregators and the simulated attacks.

Aggregators and attacks are checked against hand-computed values; robustness is measured with
tensors (n = 8, f = 2, each attack: NNA stays inside the honest spread, plain averaging is pulled
out of it by a constant factor) and through the in-process simulator, where the MoNNA driver is
compared step for step with a plain re-computation of the paper's update.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

from hvdcomp.comm import simulate
from multirank import run_ranks
from hvdcomp.robust import (MoNNA, aggregate, alie, alie_default_z, attack_vectors, flip_labels,
                            foe, label_flip, mean, median, nna, sign_flip, trimmed_mean)
from hvdcomp.robust.attacks import attack_damage, line_maximize

F64 = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=F64)


# --- aggregators by hand ----------------------------------------------------------------------

def test_aggregators_by_hand():
    four = t([[1.0, 0.0], [2.0, 10.0], [3.0, 20.0], [100.0, 30.0]])
    assert mean(four).tolist() == [26.5, 15.0]
    assert median(four).tolist() == [2.5, 15.0]                      # mean of the two middles
    assert median(four[:3]).tolist() == [2.0, 10.0]
    assert trimmed_mean(four, 1).tolist() == [2.5, 15.0]             # drop 1 low, 1 high
    assert trimmed_mean(four, 0).tolist() == [26.5, 15.0]
    line = t([[0.0], [1.0], [2.0], [10.0]])
    assert nna(line, 1, pivot=t([0.0])).tolist() == [1.0]            # (0 + 1 + 2)/3
    assert nna(line, 1, pivot=t([10.0])).item() == pytest.approx(13 / 3)   # (10 + 2 + 1)/3
    assert nna(line, 2, pivot=t([1.4])).tolist() == [1.5]            # 1 and 2
    assert aggregate("median", four).tolist() == [2.5, 15.0]
    with pytest.raises(ValueError, match="n > 2f"):
        trimmed_mean(four, 2)
    with pytest.raises(ValueError, match="pivot"):
        nna(four, 1)
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate("nosuch", four)


def test_attacks_by_hand():
    honest = t([[1.0, 2.0], [3.0, 2.0]])           # mean [2, 2], unbiased std [√2, 0]
    assert alie(honest, 1.0).tolist() == pytest.approx([2 + math.sqrt(2), 2.0])
    assert foe(honest, 0.5).tolist() == [-1.0, -1.0]               # Xie et al.: −ε·mean(H)
    assert sign_flip(honest).tolist() == [-2.0, -2.0]
    assert label_flip(honest, t([2.0, 4.0]), 0.5).tolist() == [1.0, 0.0]
    assert flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]
    # Baruch et al.: n = 8, f = 2 → s = ⌊8/2 + 1⌋ − 2 = 3, z = Φ⁻¹(5/8) ≈ 0.3186
    assert alie_default_z(8, 2) == pytest.approx(0.31864, abs=1e-4)
    vectors = attack_vectors("foe", honest, 3, param=0.5)
    assert vectors.shape == (3, 2) and vectors.tolist() == [[-1.0, -1.0]] * 3
    # without a param and with the search off: the literature's fixed strengths
    assert attack_vectors("foe", honest, 1, search=False).tolist() == [[-0.2, -0.2]]
    z = alie_default_z(3, 1)
    assert attack_vectors("alie", honest, 1, search=False)[0].tolist() == pytest.approx(
        [2 + z * math.sqrt(2), 2.0])
    with pytest.raises(ValueError, match="not both"):
        attack_vectors("alie", honest, 1, param=1.0, search=True)
    with pytest.raises(ValueError, match="flipped_gradient"):
        attack_vectors("label_flip", honest, 2)
    with pytest.raises(ValueError, match="unknown attack"):
        attack_vectors("nosuch", honest, 2)


def test_line_maximize_is_the_references_search():
    """MoNNA's tools.line_maximize, worked by hand on −(x − 5)²: from 0 with delta 1, expansion
    probes 1, 3 (delta doubles after each gain), 7 (no gain: delta = 4·0.8 = 3.2); contraction
    probes 7 − 3.2 = 3.8 (gain), then 3.8 − 2.56 = 1.24, then 1.24 + 2.048 = 3.288, then
    3.288 + 1.6384 = 4.9264 (gain), ..."""
    probes = []

    def objective(x):
        probes.append(x)
        return -(x - 5.0) ** 2
    assert line_maximize(objective, evaluations=5) == pytest.approx(3.8)
    assert probes == pytest.approx([0.0, 1.0, 3.0, 7.0, 3.8])
    assert line_maximize(objective, evaluations=8) == pytest.approx(4.9264)
    assert abs(line_maximize(objective) - 5.0) < 0.2          # the default 16 evaluations
    # an objective that only grows: the expansion doubles its step every time
    assert line_maximize(lambda x: x, evaluations=16) == 2 ** 15 - 1
    # a decreasing objective keeps the start (never below 0)
    assert line_maximize(lambda x: -x) == 0.0


# --- robustness with tensors: n = 8, f = 2 -----------------------------------------------------

N, F, D = 8, 2, 50


def honest_half_steps(seed=0, spread=0.01):
    """Six honest models in a tight cluster around a centre far from 0 (as momentum makes them)."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(D, generator=gen, dtype=F64)
    return centre + spread * torch.randn(N - F, D, generator=gen, dtype=F64)


def flipped_gradient(centre, seed=1):
    """The mean logistic-loss gradient at ``centre`` on data whose labels were flipped."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200, D, generator=gen, dtype=F64)
    y = (x @ centre > 0).to(F64)                       # labels the honest model gets right
    y_flip = flip_labels(y, 2)
    return x.T @ (torch.sigmoid(x @ centre) - y_flip) / len(y)


ATTACK_SETTINGS = {
    "alie": dict(param=10.0),
    "foe": dict(param=2.0),
    "sign_flip": dict(),
    "label_flip": dict(lr=1.0),
}


@pytest.mark.parametrize("attack", sorted(ATTACK_SETTINGS))
def test_nna_stays_in_the_honest_spread_while_averaging_is_pulled_away(attack):
    honest = honest_half_steps()
    centre = honest.mean(0)
    spread = torch.linalg.vector_norm(honest - centre, dim=1).max().item()
    kwargs = dict(ATTACK_SETTINGS[attack])
    if attack == "label_flip":
        kwargs["flipped_gradient"] = flipped_gradient(centre)
    faulty = attack_vectors(attack, honest, F, **kwargs)
    received = torch.cat([honest, faulty])             # faulty ranks last, as MoNNA simulates
    for own in honest:
        out = nna(received, F, pivot=own)
        assert torch.linalg.vector_norm(out - centre).item() <= spread
        # The coordinate-wise baselines hold too: with n > 2f each coordinate of their output lies
        # between the honest extremes of that coordinate, each within ``spread`` of the centre's,
        # so the output is within √d·spread.
        for rule in ("trimmed_mean", "median"):
            assert torch.linalg.vector_norm(aggregate(rule, received, F) - centre).item() <= \
                math.sqrt(D) * spread
    pulled = torch.linalg.vector_norm(mean(received) - centre).item()
    assert pulled >= 2 * spread, f"{attack}: averaging moved only {pulled / spread:.2f} spreads"


@pytest.mark.parametrize("attack", ["alie", "foe"])
def test_attacks_tuned_against_nna_still_cannot_leave_its_bound(attack):
    """With the line search (the reference's defence-aware z/ε) the faulty vectors may slip into
    the n − f nearest; every vector NNA keeps is then within 2·spread of the pivot (six honest
    ones are), so its output stays within 3·spread of the honest centre."""
    honest = honest_half_steps(seed=2, spread=0.05)
    centre = honest.mean(0)
    spread = torch.linalg.vector_norm(honest - centre, dim=1).max().item()
    tuned = attack_vectors(attack, honest, F)                 # the default: the line search
    fixed = attack_vectors(attack, honest, F, param=1.0)
    assert attack_damage(honest, tuned, "nna", F) >= attack_damage(honest, fixed, "nna", F)
    received = torch.cat([honest, tuned])
    for own in honest:
        assert torch.linalg.vector_norm(nna(received, F, pivot=own) - centre).item() <= 3 * spread


# --- the MoNNA driver on the simulator ----------------------------------------------------------

SHAPES = [(3, 4), (4,)]
TARGETS = [torch.linspace(-1, 1, 16, dtype=F64) * (r + 1) + r for r in range(N)]


def set_gradients(params, rank):
    """∇ of ½‖θ − c_r‖²: θ − c_r, rank r's own target c_r (heterogeneous workers)."""
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    grad = theta - TARGETS[rank]
    offset = 0
    for p in params:
        p.grad = grad[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def initial_params():
    return [torch.full(shape, 0.5, dtype=F64, requires_grad=True) for shape in SHAPES]


def monna_worker(comm, steps, lr, beta, f=F, **options):
    params = initial_params()
    driver = MoNNA(params, comm, lr=lr, beta=beta, f=f, **options)
    for _ in range(steps):
        set_gradients(params, comm.rank)
        driver.step()
    return (torch.cat([p.detach().reshape(-1) for p in params]), driver.faulty_ranks,
            driver.describe())


def monna_oracle(steps, lr, beta, aggregator, attack, **attack_kwargs):
    """Every rank's model, updated with the paper's equations on plain tensors."""
    theta = [torch.full((16,), 0.5, dtype=F64) for _ in range(N)]
    m = [torch.zeros(16, dtype=F64) for _ in range(N)]
    honest_ids, faulty_ids = list(range(N - F)), list(range(N - F, N))
    for _ in range(steps):
        grads = [theta[r] - TARGETS[r] for r in range(N)]
        half = []
        for r in range(N):
            if attack == "label_flip" and r in faulty_ids:
                half.append(None)
                continue
            m[r] = beta * m[r] + (1 - beta) * grads[r]
            half.append(theta[r] - lr * m[r])
        honest = torch.stack([half[r] for r in honest_ids])
        if attack == "label_flip":
            bad = torch.stack([honest.mean(0) - lr * grads[r] for r in faulty_ids])
        else:
            bad = attack_vectors(attack, honest, F, **attack_kwargs)
        received = torch.cat([honest, bad])
        for r in honest_ids:
            theta[r] = aggregate(aggregator, received, F, pivot=half[r])
        for r in faulty_ids:
            theta[r] = honest.mean(0)
    return theta


@pytest.mark.parametrize("attack,param", [("alie", 3.0), ("foe", 2.0), ("sign_flip", None),
                                          ("label_flip", None)])
def test_monna_driver_matches_the_papers_update_on_the_simulator(attack, param):
    options = dict(aggregator="nna", attack=attack, simulate_faults=True)
    if param is not None:
        options["attack_param"] = param
    results = simulate(N, monna_worker, 4, 0.3, 0.9, **options)
    kwargs = {"param": param} if param is not None else {}
    expected = monna_oracle(4, 0.3, 0.9, "nna", attack, **kwargs)
    for rank, (theta, faulty, described) in enumerate(results):
        assert faulty == (6, 7)
        assert described["simulated_faults"] is True and described["faulty_ranks"] == [6, 7]
        torch.testing.assert_close(theta, expected[rank], rtol=0, atol=1e-12,
                                   msg=f"rank {rank}")


@pytest.mark.parametrize("aggregator,ok", [("nna", True), ("mean", False)])
def test_under_sign_flipping_nna_learns_the_honest_optimum_and_averaging_does_not(aggregator, ok):
    """½‖θ − c_r‖² per rank: the honest optimum is the mean of the honest targets."""
    results = simulate(N, monna_worker, 150, 0.3, 0.5, aggregator=aggregator,
                       attack="sign_flip", simulate_faults=True)
    optimum = torch.stack(TARGETS[:N - F]).mean(0)
    for rank in range(N - F):
        error = torch.linalg.vector_norm(results[rank][0] - optimum).item()
        scale = torch.linalg.vector_norm(optimum).item()
        if ok:
            assert error < 1e-6 * scale
        else:
            assert error > 0.3 * scale


def _construct(comm, **options):
    driver = MoNNA(initial_params(), comm, lr=0.1, f=F, **options)
    return driver.faulty_ranks, driver.honest_ranks, driver.is_faulty


def test_attacks_need_simulate_faults_and_are_labelled(caplog):
    with pytest.raises(ValueError, match="simulate_faults=True"):
        simulate(N, _construct, attack="alie")
    with pytest.raises(ValueError, match="attack="):
        simulate(N, _construct, simulate_faults=True)
    with pytest.raises(ValueError, match="n > 2f"):
        simulate(3, _construct)
    with caplog.at_level(logging.WARNING, logger="hvdcomp.robust.monna"):
        results = simulate(N, _construct, attack="foe", simulate_faults=True)
    assert "SIMULATED FAULTY WORKERS" in caplog.text
    assert [r[2] for r in results] == [False] * 6 + [True] * 2
    assert results[0][:2] == ((6, 7), (0, 1, 2, 3, 4, 5))
    # without simulation f only sets the tolerance: nobody is faulty
    assert simulate(N, _construct)[0][:2] == ((), tuple(range(N)))


def monna_ranks(**options):
    """Module-level body for real Horovod ranks: the driver over Horovod's allgather."""
    from hvdcomp.comm import HorovodCommunicator
    return monna_worker(HorovodCommunicator(), **options)


@pytest.mark.mpi
def test_monna_on_real_ranks_equals_the_simulator():
    options = dict(steps=3, lr=0.3, beta=0.9, f=1, attack="sign_flip", simulate_faults=True)
    real = run_ranks(monna_ranks, np=3, controller="mpi", timeout=300, **options)
    simulated = simulate(3, monna_worker, **options)
    for rank in range(3):
        assert torch.equal(real[rank][0], simulated[rank][0])
        assert real[rank][1] == (2,)


@pytest.mark.parametrize("attack", ["alie", "foe"])
def test_default_attacks_ruin_averaging_while_nna_holds(attack):
    """With the defaults (the MoNNA authors' line search against the defence in use), plain
    averaging is driven thousands of honest spreads away from the honest optimum — the search
    against a mean has no bound — while NNA stays within the honest workers' heterogeneity
    (max_r ‖c_r − c̄‖: with such different targets no rule can promise more). Issue 13: the old
    fixed z and ε barely moved averaging."""
    optimum = torch.stack(TARGETS[:N - F]).mean(0)
    heterogeneity = max(torch.linalg.vector_norm(c - optimum).item() for c in TARGETS[:N - F])
    errors = {}
    for aggregator in ("nna", "mean"):
        results = simulate(N, monna_worker, 40, 0.3, 0.5, aggregator=aggregator, attack=attack,
                           simulate_faults=True)
        described = results[0][2]
        assert described["line_search"] is True and described["attack_param"] is None
        worst = max(torch.linalg.vector_norm(results[r][0] - optimum).item()
                    for r in range(N - F))
        errors[aggregator] = worst if math.isfinite(worst) else math.inf
    assert errors["nna"] < heterogeneity, errors
    assert errors["mean"] > 100 * heterogeneity, errors
