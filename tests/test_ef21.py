"""EF21, EF21-W, EF21-SGDM and EF21-BC against plain float64 implementations of the papers' updates.

The rounds are driven here by a small plain loop over the five steps of
:mod:`hvdcomp.algorithms.base` (one object per worker; worker j also serves chunk j when the bucket
is cut into chunks), so these tests need neither the exchange nor a communicator. The oracles are
written from the papers' pseudo-code (research notes §2), with their own top-k, and never call the
code under test.
"""
from __future__ import annotations

import math

import pytest
import torch

from hvdcomp.algorithms import make_algorithm
from hvdcomp.algorithms.base import Algorithm
from hvdcomp.algorithms.ef21 import EF21, EF21BC, EF21SGDM, EF21W
from hvdcomp.algorithms.stepsize import (
    ef21_stepsize, ef21_theta_beta, ef21_xi, ef21w_stepsize, ef21w_weights, logistic_smoothness,
    topk_alpha)
from hvdcomp.comm import simulate
from hvdcomp.compressors import Compressor
from hvdcomp.exchange import Exchange, chunk_bounds as exchange_chunks
from multirank import run_ranks

F64 = torch.float64


class ExactTopK(Compressor):
    """A real top-k compressor for these tests: k values in the tensor's dtype + k int64 indices.

    Test-local so the EF21 tests are independent of the compressor engineer's top-k (and exact in
    float64)."""
    name = "test-topk"

    def __init__(self, k: int):
        self.k = k

    def payload_nbytes(self, numel, dtype=torch.float32):
        k = min(self.k, numel)
        return k * (torch.empty((), dtype=dtype).element_size() + 8)

    def compress(self, x, seed=0):
        k = min(self.k, x.numel())
        index = x.abs().topk(k).indices
        values = x[index].contiguous().view(torch.uint8)
        return torch.cat([values, index.to(torch.int64).view(torch.uint8)])

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        k = min(self.k, numel)
        nvalue = k * torch.empty((), dtype=dtype).element_size()
        values = payload[:nvalue].clone().view(dtype)
        index = payload[nvalue:].clone().view(torch.int64)
        out = torch.zeros(numel, dtype=dtype)
        out[index] = values
        return out


def oracle_topk(v: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k written independently of ExactTopK: keep the k largest |v_j|, zero the rest."""
    out = torch.zeros_like(v)
    index = torch.argsort(v.abs(), descending=True, stable=True)[:k]
    out[index] = v[index]
    return out


def chunk_bounds(d: int, n_chunks: int):
    size = math.ceil(d / n_chunks)
    return [(min(j * size, d), min((j + 1) * size, d)) for j in range(n_chunks)]


def run_round(workers, grads, key="bucket", n_chunks=1):
    """One round of the five steps; worker j is the server of chunk j. Returns every direction."""
    up, down = workers[0].up, workers[0].down
    bounds = chunk_bounds(grads[0].numel(), n_chunks)
    sent_by_worker = []
    for worker, grad in zip(workers, grads):
        message = worker.worker_message(key, grad)
        if n_chunks == 1:
            sent = up.roundtrip(message)[1]
        else:
            sent = torch.cat([up.roundtrip(message[a:b])[1] for a, b in bounds])
        worker.worker_sent(key, message, sent)
        sent_by_worker.append(sent)
    received = []
    for j, (a, b) in enumerate(bounds):
        mean = torch.stack([sent[a:b] for sent in sent_by_worker]).mean(0)
        server_msg = workers[j].server_message(key, mean)
        server_sent = down.roundtrip(server_msg)[1]
        workers[j].server_sent(key, server_msg, server_sent)
        received.append(server_sent)
    received = torch.cat(received)
    directions = [worker.worker_update(key, received) for worker in workers]
    for worker in workers:
        worker.end_round()
    return directions


# --- a small smooth problem for the step-by-step comparisons ---------------------------------

def quadratic_problem(n=4, d=12, seed=0, dtype=F64):
    """f_i(x) = ½ xᵀ A_i x − b_iᵀ x with different A_i per worker; returns ∇f_i callables."""
    gen = torch.Generator().manual_seed(seed)
    mats, vecs = [], []
    for i in range(n):
        q = torch.randn(d, d, generator=gen, dtype=F64)
        mats.append((q @ q.T / d + (i + 1) * torch.eye(d, dtype=F64)).to(dtype))
        vecs.append((torch.randn(d, generator=gen, dtype=F64) * (i + 1)).to(dtype))
    return [lambda x, a=a, b=b: a @ x - b for a, b in zip(mats, vecs)]


def run_algorithm(workers, grad_fns, x0, gamma, rounds, n_chunks=1):
    """x^{k+1} = x^k − γ·direction, with the direction from one round; returns x^0..x^rounds."""
    x, trajectory = x0.clone(), [x0.clone()]
    for _ in range(rounds):
        directions = run_round(workers, [fn(x) for fn in grad_fns], n_chunks=n_chunks)
        for direction in directions[1:]:
            assert torch.equal(direction, directions[0]), "workers must apply the same direction"
        x = x - gamma * directions[0]
        trajectory.append(x.clone())
    return trajectory


# --- EF21: step for step against the paper ---------------------------------------------------

def ef21_oracle(grad_fns, x0, gamma, rounds, k):
    """EF21, Richtárik et al. 2021, Alg. 1, with g_i^0 = C(∇f_i(x^0)), g^0 = mean g_i^0."""
    n = len(grad_fns)
    g_i = [oracle_topk(fn(x0), k) for fn in grad_fns]
    g = sum(g_i) / n
    x, trajectory = x0.clone(), [x0.clone()]
    for _ in range(rounds):
        x = x - gamma * g                                         # x^{t+1} = x^t − γ g^t
        c = [oracle_topk(fn(x) - gi, k) for fn, gi in zip(grad_fns, g_i)]
        g_i = [gi + ci for gi, ci in zip(g_i, c)]                 # g_i^{t+1} = g_i^t + c_i^t
        g = g + sum(c) / n                                        # g^{t+1} = g^t + mean c_i^t
        trajectory.append(x.clone())
    return trajectory, g_i, g


def test_ef21_matches_the_paper_step_for_step():
    grad_fns = quadratic_problem()
    x0 = torch.linspace(-1, 1, 12, dtype=F64)
    workers = [EF21(up=ExactTopK(2)) for _ in grad_fns]
    ours = run_algorithm(workers, grad_fns, x0, gamma=0.05, rounds=30)
    theirs, g_i, _ = ef21_oracle(grad_fns, x0, gamma=0.05, rounds=29, k=2)
    # our round k ends with the direction g^k; the oracle's x^{k+1} = x^k − γ g^k is our x^{k+1}
    for step, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"x differs at step {step}")
    # our 30 rounds (k = 0..29) leave g_i^{29}, computed at x^{29}, as the oracle's 29 iterations do
    for worker, gi in zip(workers, g_i):
        torch.testing.assert_close(worker.worker_estimate["bucket"], gi, rtol=0, atol=1e-12)
    # everyone's g is the mean of the g_i (server chunk = whole bucket here, held by worker 0)
    torch.testing.assert_close(workers[0].server_aggregate["bucket"],
                               sum(w.worker_estimate["bucket"] for w in workers) / len(workers),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [EF21, EF21BC, EF21SGDM])
def test_identity_compression_is_gradient_descent(cls):
    grad_fns = quadratic_problem()
    x0 = torch.linspace(-1, 1, 12, dtype=F64)
    kwargs = {"eta": 1.0} if cls is EF21SGDM else {}
    workers = [cls(up="none", down="none", **kwargs) for _ in grad_fns]
    ours = run_algorithm(workers, grad_fns, x0, gamma=0.05, rounds=15, n_chunks=3)
    x = x0.clone()
    for step, a in enumerate(ours):
        torch.testing.assert_close(a, x, rtol=0, atol=1e-12, msg=f"step {step}")
        x = x - 0.05 * sum(fn(x) for fn in grad_fns) / len(grad_fns)


def test_ef21w_with_identity_compression_is_gradient_descent():
    grad_fns = quadratic_problem()
    x0 = torch.linspace(-1, 1, 12, dtype=F64)
    smooth = [1.0, 3.0, 10.0, 30.0]
    workers = [EF21W(up="none", smoothness=smooth, rank=i) for i in range(4)]
    ours = run_algorithm(workers, grad_fns, x0, gamma=0.05, rounds=10)
    x = x0.clone()
    for a in ours:
        torch.testing.assert_close(a, x, rtol=0, atol=1e-12)
        x = x - 0.05 * sum(fn(x) for fn in grad_fns) / len(grad_fns)


def test_ef21w_matches_the_weighted_paper_update():
    """EF21-W as written in Error Feedback Reloaded: u_i = C(∇f_i/(n w_i) − g_i), g = Σ w_i g_i."""
    grad_fns = quadratic_problem()
    n, k, gamma = len(grad_fns), 3, 0.04
    smooth = [1.0, 2.0, 8.0, 40.0]
    w = [s / sum(smooth) for s in smooth]
    x0 = torch.linspace(-1, 1, 12, dtype=F64)
    workers = [EF21W(up=ExactTopK(k), smoothness=smooth, rank=i) for i in range(n)]
    ours = run_algorithm(workers, grad_fns, x0, gamma, rounds=25)

    g_i = [oracle_topk(fn(x0) / (n * wi), k) for fn, wi in zip(grad_fns, w)]
    g = sum(wi * gi for wi, gi in zip(w, g_i))
    x = x0.clone()
    torch.testing.assert_close(ours[0], x)
    for step in range(1, 26):
        x = x - gamma * g
        torch.testing.assert_close(ours[step], x, rtol=0, atol=1e-12, msg=f"step {step}")
        u = [oracle_topk(fn(x) / (n * wi) - gi, k) for fn, wi, gi in zip(grad_fns, w, g_i)]
        g_i = [gi + ui for gi, ui in zip(g_i, u)]
        g = g + sum(wi * ui for wi, ui in zip(w, u))
    # the server's aggregate is the weighted mean Σ w_i g_i of the paper's estimates
    weighted = sum(wi * wk.worker_estimate["bucket"] for wi, wk in zip(w, workers))
    torch.testing.assert_close(workers[0].server_aggregate["bucket"], weighted, rtol=0, atol=1e-12)


def test_ef21sgdm_matches_its_update():
    """v_i = (1−η) v_i + η ∇f_i, g_i += C(v_i − g_i), x ← x − γ g (research §2.3)."""
    grad_fns = quadratic_problem()
    n, k, gamma, eta = len(grad_fns), 2, 0.05, 0.3
    x0 = torch.linspace(-1, 1, 12, dtype=F64)
    workers = [EF21SGDM(up=ExactTopK(k), eta=eta) for _ in range(n)]
    ours = run_algorithm(workers, grad_fns, x0, gamma, rounds=20)
    v = [fn(x0) for fn in grad_fns]
    g_i = [oracle_topk(vi, k) for vi in v]
    g = sum(g_i) / n
    x = x0.clone()
    for step in range(1, 21):
        x = x - gamma * g
        torch.testing.assert_close(ours[step], x, rtol=0, atol=1e-12, msg=f"step {step}")
        v = [(1 - eta) * vi + eta * fn(x) for vi, fn in zip(v, grad_fns)]
        c = [oracle_topk(vi - gi, k) for vi, gi in zip(v, g_i)]
        g_i = [gi + ci for gi, ci in zip(g_i, c)]
        g = g + sum(c) / n


@pytest.mark.parametrize("n_chunks", [1, 2])
def test_ef21bc_matches_the_paper_with_a_sharded_server(n_chunks):
    """EF21-BC (Bells & Whistles): the master's g̃, b = C_M(g̃ − g), g += b; with n_chunks = 2
    the master's role is split over two ranks and both compressors act per chunk."""
    grad_fns = quadratic_problem()
    n, gamma, k_up, k_down = len(grad_fns), 0.04, 2, 3
    d = 12
    bounds = chunk_bounds(d, n_chunks)

    def chunked(v, k):
        return torch.cat([oracle_topk(v[a:b], k) for a, b in bounds])

    x0 = torch.linspace(-1, 1, d, dtype=F64)
    workers = [EF21BC(up=ExactTopK(k_up), down=ExactTopK(k_down)) for _ in range(n)]
    ours = run_algorithm(workers, grad_fns, x0, gamma, rounds=25, n_chunks=n_chunks)

    # paper, with g̃_i^{-1} = 0, g^{-1} = 0: the first round produces g^0 from ∇f_i(x^0)
    g_tilde_i = [torch.zeros(d, dtype=F64) for _ in range(n)]
    g = torch.zeros(d, dtype=F64)
    x = x0.clone()
    for step in range(25):
        torch.testing.assert_close(ours[step], x, rtol=0, atol=1e-12, msg=f"step {step}")
        c = [chunked(fn(x) - gt, k_up) for fn, gt in zip(grad_fns, g_tilde_i)]
        g_tilde_i = [gt + ci for gt, ci in zip(g_tilde_i, c)]
        g_tilde = sum(g_tilde_i) / n
        b = chunked(g_tilde - g, k_down)
        g = g + b
        x = x - gamma * g
    torch.testing.assert_close(ours[25], x, rtol=0, atol=1e-12)
    # the master's g̃ is the mean of the workers' g̃_i, on each rank's chunk
    for j, (a, b_) in enumerate(bounds):
        mean_estimate = sum(w.worker_estimate["bucket"][a:b_] for w in workers) / n
        torch.testing.assert_close(workers[j].server_estimate["bucket"], mean_estimate,
                                   rtol=0, atol=1e-12)


def test_state_dict_resume_continues_the_same_trajectory():
    grad_fns = quadratic_problem()
    x0 = torch.linspace(-1, 1, 12, dtype=F64)
    make = lambda: [EF21BC(up=ExactTopK(2), down=ExactTopK(4)) for _ in grad_fns]  # noqa: E731
    straight = run_algorithm(make(), grad_fns, x0, 0.05, rounds=12, n_chunks=2)
    first = make()
    part = run_algorithm(first, grad_fns, x0, 0.05, rounds=5, n_chunks=2)
    resumed = make()
    for old, new in zip(first, resumed):
        new.load_state_dict(old.state_dict())
    rest = run_algorithm(resumed, grad_fns, part[-1], 0.05, rounds=7, n_chunks=2)
    torch.testing.assert_close(rest[-1], straight[-1], rtol=0, atol=0)


def test_ef21w_refuses_missing_weights_or_rank():
    with pytest.raises(ValueError, match="smoothness"):
        EF21W(up="none", rank=0)
    with pytest.raises(ValueError, match="rank"):
        EF21W(up="none", smoothness=[1.0, 2.0])
    with pytest.raises(ValueError, match="rank"):
        EF21W(up="none", smoothness=[1.0, 2.0], rank=2)
    with pytest.raises(ValueError, match="positive"):
        EF21W(up="none", smoothness=[1.0, 0.0], rank=0)
    with pytest.raises(ValueError, match="eta"):
        EF21SGDM(up="none", eta=0.0)


# --- the stepsize helper ------------------------------------------------------------------------

def test_stepsize_constants_match_their_definitions():
    for alpha in (0.01, 0.05, 0.3, 0.9):
        theta, beta = ef21_theta_beta(alpha)
        # the optimised Young parameter s = 1/√(1−α) − 1 of research §2.1
        s = 1 / math.sqrt(1 - alpha) - 1
        assert theta == pytest.approx(1 - (1 - alpha) * (1 + s))
        assert beta == pytest.approx((1 - alpha) * (1 + 1 / s))
        assert ef21_xi(alpha) == pytest.approx((1 + math.sqrt(1 - alpha)) / alpha - 1)
        assert ef21_xi(alpha) <= 2 / alpha - 1
    assert ef21_xi(1.0) == 0.0
    smooth = [1.0, 1.0, 100.0]
    lqm = math.sqrt((1 + 1 + 100 ** 2) / 3)
    lam = 34.0
    xi = ef21_xi(0.1)
    assert ef21_stepsize(2.0, smooth, 0.1) == pytest.approx(1 / (2.0 + lqm * xi))
    assert ef21w_stepsize(2.0, smooth, 0.1) == pytest.approx(1 / (2.0 + lam * xi))
    assert ef21w_weights([1.0, 3.0]) == pytest.approx([0.25, 0.75])
    assert topk_alpha(1, 20) == 0.05
    with pytest.raises(ValueError, match="alpha"):
        ef21_xi(0.0)


# --- the paper's experiment, small --------------------------------------------------------------

LAMBDA = 0.1


def logistic_workers(n=10, d=20, m=50, spread=100.0, seed=0):
    """Heterogeneous binary classification data: worker i's features are scaled by
    √(spread^{i/(n−1)}), so the L_i span a factor ≈ ``spread``; labels from a worker-specific
    linear model plus noise."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, m, d, generator=gen, dtype=F64)
    scales = torch.tensor([math.sqrt(spread ** (i / (n - 1))) for i in range(n)], dtype=F64)
    features = features * scales[:, None, None]
    truth = torch.randn(n, d, generator=gen, dtype=F64)
    noise = 0.5 * torch.randn(n, m, generator=gen, dtype=F64)
    labels = torch.sign(torch.einsum("imd,id->im", features, truth) + noise)
    return features, labels


def logistic_gradients(features, labels, x):
    """∇f_i(x) for every worker: mean logistic loss + λ Σ x_j²/(1 + x_j²) (EF21 §5)."""
    # Plain 2-D and element-wise ops: batched matmuls of these tiny tensors go multi-threaded and
    # crawl on a busy machine.
    n, m, d = features.shape
    margins = labels * (features.reshape(n * m, d) @ x).reshape(n, m)
    weights = torch.sigmoid(-margins) * labels
    loss_grad = -(features * weights.unsqueeze(2)).sum(1) / m
    return loss_grad + LAMBDA * 2 * x / (1 + x * x) ** 2


def rounds_to_tolerance(workers, features, labels, gamma, tol=1e-3, max_rounds=6000):
    """Rounds until ‖∇f(x^k)‖ < tol (∇f = mean of the ∇f_i), or (max_rounds, final norm)."""
    x = torch.zeros(features.shape[2], dtype=F64)
    for k in range(max_rounds):
        grads = logistic_gradients(features, labels, x)
        norm = grads.mean(0).norm().item()
        if norm < tol:
            return k, norm
        direction = run_round(workers, list(grads))[0]
        x = x - gamma * direction
    return max_rounds, logistic_gradients(features, labels, x).mean(0).norm().item()


def test_ef21_converges_where_topk_without_feedback_stalls_and_ef21w_is_faster():
    features, labels = logistic_workers()
    n, d = features.shape[0], features.shape[2]
    smooth = [logistic_smoothness(features[i], LAMBDA) for i in range(n)]
    assert max(smooth) / min(smooth) > 50, "the test needs L_i that differ a lot"
    big_l = logistic_smoothness(features.reshape(-1, d), LAMBDA)  # f = mean f_i, equal m_i
    alpha = topk_alpha(1, d)
    gamma_ef21 = ef21_stepsize(big_l, smooth, alpha)
    gamma_ef21w = ef21w_stepsize(big_l, smooth, alpha)
    assert gamma_ef21w > 1.3 * gamma_ef21

    rounds_ef21, norm_ef21 = rounds_to_tolerance(
        [EF21(up=ExactTopK(1)) for _ in range(n)], features, labels, gamma_ef21)
    assert norm_ef21 < 1e-3, f"EF21 stopped at ‖∇f‖ = {norm_ef21:.2e}"

    rounds_ef21w, norm_ef21w = rounds_to_tolerance(
        [EF21W(up=ExactTopK(1), smoothness=smooth, rank=i) for i in range(n)],
        features, labels, gamma_ef21w)
    assert norm_ef21w < 1e-3
    assert rounds_ef21w < 0.8 * rounds_ef21, (rounds_ef21w, rounds_ef21)

    # top-1 without error feedback (the plain average of C(∇f_i), dense downlink), given as many
    # rounds as EF21-W needed, stays 100× above the tolerance
    _, norm_plain = rounds_to_tolerance(
        [Algorithm(up=ExactTopK(1), down="none") for _ in range(n)], features, labels,
        gamma_ef21w, max_rounds=rounds_ef21w)
    assert norm_plain > 100 * 1e-3, f"top-1 without feedback reached {norm_plain:.2e}"


# --- through the exchange, on the in-process simulator (and on real ranks) -------------------

SIM_N, SIM_D, SIM_ROUNDS, SIM_GAMMA = 4, 300, 8, 0.05
SIM_SMOOTHNESS = [1.0, 4.0, 9.0, 30.0]


def sim_hyper(name, rank):
    return {"smoothness": SIM_SMOOTHNESS, "rank": rank} if name == "ef21w" else {}


def exchange_trajectory(comm, name, up, down, pattern):
    """One rank: x^{k+1} = x^k − γ·(the exchange's update for ∇f_rank(x^k))."""
    grad_fn = quadratic_problem(SIM_N, SIM_D, dtype=torch.float32)[comm.rank]
    algo = make_algorithm(name, up=up, down=down, **sim_hyper(name, comm.rank))
    exchange = Exchange(algo, comm, pattern=pattern)
    x = torch.linspace(-1, 1, SIM_D)
    trajectory = [x]
    for _ in range(SIM_ROUNDS):
        x = x - SIM_GAMMA * exchange.exchange("weights", grad_fn(x))
        exchange.end_round()
        trajectory.append(x)
    return trajectory


def ranks_trajectory(name, up, down, pattern):
    """Module-level body for real Horovod ranks."""
    from hvdcomp.comm import HorovodCommunicator
    return exchange_trajectory(HorovodCommunicator(), name, up, down, pattern)


def ef21_family_oracle(name, k_up, k_down, bounds):
    """EF21 / EF21-W / EF21-BC from the papers' equations, top-k applied per chunk of ``bounds``
    (the sharded server compresses each rank's chunk separately), float32 like the exchange."""
    grad_fns = quadratic_problem(SIM_N, SIM_D, dtype=torch.float32)
    n = SIM_N

    def topk(v, k):
        return torch.cat([oracle_topk(v[a:b], min(k(b - a), b - a)) if b > a else v[a:b]
                          for a, b in bounds])

    w = [s / sum(SIM_SMOOTHNESS) for s in SIM_SMOOTHNESS]
    g_i = [torch.zeros(SIM_D) for _ in range(n)]      # g_i (EF21, EF21-W) or g̃_i (EF21-BC)
    g = torch.zeros(SIM_D)
    x = torch.linspace(-1, 1, SIM_D)
    trajectory = [x]
    for _ in range(SIM_ROUNDS):
        grads = [fn(x) for fn in grad_fns]
        if name == "ef21w":
            # u_i = C(∇f_i/(n w_i) − g_i) (top-k is positively homogeneous); g = Σ w_i g_i
            u = [topk(gr / (n * wi) - gi, k_up) for gr, wi, gi in zip(grads, w, g_i)]
            g_i = [gi + ui for gi, ui in zip(g_i, u)]
            g = sum(wi * gi for wi, gi in zip(w, g_i))
        else:
            c = [topk(gr - gi, k_up) for gr, gi in zip(grads, g_i)]
            g_i = [gi + ci for gi, ci in zip(g_i, c)]
            mean_c = c[0].clone()
            for ci in c[1:]:
                mean_c += ci
            mean_c /= n
            if name == "ef21":
                g = g + mean_c
            else:  # ef21bc: the master's g̃ = mean g̃_i, b = C_M(g̃ − g), g += b
                g_tilde = sum(g_i) / n
                g = g + topk(g_tilde - g, k_down)
        x = x - SIM_GAMMA * g
        trajectory.append(x)
    return trajectory


def ratio_k(ratio):
    return lambda numel: math.ceil(ratio * numel)


# (EF21-BC only with two_phase: the allgather pattern never compresses the downlink.)
@pytest.mark.parametrize("name,down,pattern", [
    ("ef21", None, "two_phase"), ("ef21w", None, "two_phase"),
    ("ef21bc", "topk:ratio=0.2", "two_phase"),
    ("ef21", None, "allgather"), ("ef21w", None, "allgather")])
def test_ef21_family_through_the_exchange_matches_the_papers(name, down, pattern):
    up = "topk:ratio=0.05"
    results = simulate(SIM_N, exchange_trajectory, name, up, down, pattern)
    bounds = exchange_chunks(SIM_D, SIM_N) if pattern == "two_phase" else [(0, SIM_D)]
    expected = ef21_family_oracle(name, ratio_k(0.05), ratio_k(0.2), bounds)
    for rank, trajectory in enumerate(results):
        for step, (ours, theirs) in enumerate(zip(trajectory, expected)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5,
                                       msg=f"{name} rank {rank} step {step}")


@pytest.mark.mpi
def test_ef21bc_on_real_ranks_equals_the_simulator():
    real = run_ranks(ranks_trajectory, np=SIM_N, controller="mpi", timeout=300, name="ef21bc",
                     up="topk:ratio=0.05", down="topk:ratio=0.2", pattern="two_phase")
    simulated = simulate(SIM_N, exchange_trajectory, "ef21bc", "topk:ratio=0.05",
                         "topk:ratio=0.2", "two_phase")
    for rank in range(SIM_N):
        for ours, theirs in zip(real[rank], simulated[rank]):
            assert torch.equal(ours, theirs)
