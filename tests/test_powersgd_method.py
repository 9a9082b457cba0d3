"""PowerSGD as a method (``powersgd_ef``) against an independent float64 oracle of the paper's
Algorithm 1 inside Algorithm 2 (error feedback), on the simulator and on 2 real Horovod ranks;
its byte accounting; and that it trains on digits.

The oracle below is written from the paper (Vogels, Karimireddy, Jaggi 2019), not from the
module: one loop over steps holding every worker's matrices, QR (LAPACK) for the
orthogonalisation instead of the module's Gram-Schmidt (P̂P̂ᵀ does not depend on the columns'
signs, so the two agree to float64 rounding), the first Q drawn by the documented recipe.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from hvdcomp.comm import simulate
from hvdcomp.exchange import Exchange
from hvdcomp.algorithms import make_algorithm

from multirank import require, run_ranks

SHAPES = [(6, 10), (10,), (4, 3, 5), (3, 2)]   # a matrix, a bias, a conv-like tensor, a small one
RANK, STEPS, WORLD = 2, 4, 2


def _grads(steps: int, world: int) -> torch.Tensor:
    numel = sum(torch.Size(s).numel() for s in SHAPES)
    generator = torch.Generator().manual_seed(7)
    return torch.randn(steps, world, numel, generator=generator, dtype=torch.float64)


def oracle(grads: torch.Tensor, rank: int, start_iter: int = 0, rate: float = 2.0,
           seed: int = 0, key: str = "b0") -> torch.Tensor:
    """Update of every step (the same on every worker) for ``grads[t, i]``."""
    steps, world, _ = grads.shape
    pieces, offset = [], 0
    for shape in SHAPES:
        size = torch.Size(shape).numel()
        pieces.append((offset, shape, size))
        offset += size
    errors, qs = {}, {}
    updates = torch.empty(steps, grads.shape[2], dtype=torch.float64)
    for t in range(steps):
        if t < start_iter:
            updates[t] = sum(grads[t, i] for i in range(world)) * (1.0 / world)
            continue
        index = 0
        for start, shape, size in pieces:
            n = shape[0] if len(shape) > 1 else 0
            m = size // n if n else 0
            r = min(rank, n, m)
            mats = [grads[t, i, start:start + size] for i in range(world)]
            if not (r and r * (n + m) * rate < n * m):        # dense, no error kept
                updates[t, start:start + size] = sum(mats) * (1.0 / world)
                continue
            M = [mats[i].view(n, m) + errors.get((i, index), 0) for i in range(world)]
            if index not in qs:
                g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}:{index}".encode()))
                qs[index] = torch.randn(m, r, generator=g, dtype=torch.float64)
            P = sum(Mi @ qs[index] for Mi in M) * (1.0 / world)
            P_hat = torch.linalg.qr(P).Q
            Q = sum(Mi.T @ P_hat for Mi in M) * (1.0 / world)
            U = P_hat @ Q.T
            for i in range(world):
                errors[(i, index)] = M[i] - U
            qs[index] = Q
            updates[t, start:start + size] = U.reshape(-1)
            index += 1
    return updates


def _run_method(comm, grads, options):
    algo = make_algorithm("powersgd_ef", **options)
    algo.set_shapes("b0", SHAPES)
    exchange = Exchange(algo, comm, pattern="allreduce")
    out = []
    for t in range(grads.shape[0]):
        out.append(exchange.exchange("b0", grads[t, comm.rank].clone()))
        exchange.end_round()
    return torch.stack(out), dict(exchange.bytes_by_phase), exchange.bytes_up


@pytest.mark.parametrize("options", [dict(rank=RANK), dict(rank=1, start_iter=2),
                                     dict(rank=3, min_compression_rate=1.0)])
def test_simulator_matches_the_papers_algorithm(options):
    grads = _grads(STEPS, WORLD)
    results = simulate(WORLD, _run_method, grads, options)
    expected = oracle(grads, options["rank"], options.get("start_iter", 0),
                      options.get("min_compression_rate", 2.0))
    for updates, _, _ in results:
        torch.testing.assert_close(updates, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)


def _ring(numel: int, item: int, world: int, rank: int):
    per = -(-numel // world)
    pieces = [(min(j * per, numel), min((j + 1) * per, numel)) for j in range(world)]
    up = sum((b - a) * item for j, (a, b) in enumerate(pieces) if j != rank)
    a, b = pieces[rank]
    return up + (world - 1) * (b - a) * item


def test_bytes_are_three_ring_allreduces_of_the_factors_and_dense_tensors():
    grads = _grads(3, WORLD)
    results = simulate(WORLD, _run_method, grads, dict(rank=1, start_iter=1))
    # compressed: (6,10) r=1: P 6, Q 10; (4,3,5)->4x15: P 4, Q 15; dense: bias 10 + (3,2) 6
    for rank, (_, phases, _) in enumerate(results):
        assert phases["powersgd_startup"] == _ring(SUM_NUMEL, 8, WORLD, rank)
        assert phases["powersgd_p"] == 2 * _ring(6 + 4, 8, WORLD, rank)
        assert phases["powersgd_q"] == 2 * _ring(10 + 15, 8, WORLD, rank)
        assert phases["powersgd_dense"] == 2 * _ring(10 + 6, 8, WORLD, rank)


SUM_NUMEL = sum(torch.Size(s).numel() for s in SHAPES)


def _real_ranks(steps):
    from hvdcomp.comm import HorovodCommunicator
    grads = _grads(steps, WORLD)
    updates, _, _ = _run_method(HorovodCommunicator(), grads, dict(rank=RANK))
    return updates


@pytest.mark.mpi
def test_two_real_ranks_match_the_oracle():
    require("mpi")
    results = run_ranks(_real_ranks, np=2, controller="mpi", steps=STEPS)
    expected = oracle(_grads(STEPS, WORLD), RANK)
    for updates in results:
        torch.testing.assert_close(updates, expected, rtol=0, atol=1e-12)


def test_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match="rank"):
        make_algorithm("powersgd_ef", rank=0)
    with pytest.raises(ValueError, match="own rank-r factors"):
        make_algorithm("powersgd_ef", up="sign")
    with pytest.raises(ValueError, match="min_compression_rate"):
        make_algorithm("powersgd_ef", min_compression_rate=0.5)


def _train_digits(comm, steps: int):
    """Rank ``comm.rank`` of 2 trains an MLP on its half of digits through
    hvdcomp.DistributedOptimizer with Compression.powersgd_ef(rank=1); returns the test accuracy
    of its model and the run's bytes up per step."""
    import hvdcomp
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train_x, train_y, test_x, test_y = x[:1400], y[:1400], x[1400:], y[1400:]
    mine = torch.arange(comm.rank, 1400, comm.size)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    # the same start on every rank from a generator of its own: simulated ranks are threads of
    # one process, and torch.manual_seed would race on the global generator they share
    start = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=start) * 0.1)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer = hvdcomp.DistributedOptimizer(
        base, named_parameters=model.named_parameters(), comm=comm, small_tensor_bytes=0,
        compression=hvdcomp.Compression.powersgd_ef(rank=1))
    generator = torch.Generator().manual_seed(comm.rank)
    for _ in range(steps):
        batch = mine[torch.randint(len(mine), (32,), generator=generator)]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    return accuracy, optimizer.exchange.bytes_up / steps


def test_trains_digits_through_distributed_optimizer():
    results = simulate(2, _train_digits, 300)
    dense_per_step = (64 * 64 + 64 + 64 * 10 + 10) * 4 / 2   # ring: (N-1)/N of the gradient
    for accuracy, up_per_step in results:
        assert accuracy > 0.85
        assert up_per_step < dense_per_step / 4              # rank-1 factors: far below dense
    assert results[0][0] == results[1][0]                    # every rank applied the same update
