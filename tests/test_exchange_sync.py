"""LIEC-SGD's exact round: the gradient and the parameters travel in ONE allreduce (Exchange.start
with params), with the same values bit for bit as two separate collectives, checked against a
float64 oracle of the formulas; the ledger counts one ring allreduce of both."""
from __future__ import annotations

import torch

from hvdcomp.algorithms import make_algorithm
from hvdcomp.comm.simulator import simulate
from hvdcomp.exchange import Exchange
from hvdcomp.exchange_ledger import ring_allreduce_bytes

N, D, PERIOD = 3, 300, 2


def data(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(D, generator=g), [torch.randn(5, 20, generator=g), torch.randn(200,
                                                                                    generator=g)]


def run(comm, joint: bool):
    ex = Exchange(make_algorithm("liec", up="sign", period=PERIOD), comm)
    out = []
    for step in range(2 * PERIOD):
        grad, params = data(comm.rank, step)
        sync = ex.is_sync_step()
        update = ex.finish(ex.start("b", grad, params=params if joint else ()))
        if sync and not joint:
            ex.average_parameters(params)
        ex.end_round()
        out.append((sync, update.clone(), [p.clone() for p in params]))
    return out, dict(ex.bytes_by_phase), (ex.bytes_up, ex.bytes_down)


def test_one_collective_gives_the_two_collectives_values_bit_for_bit():
    joint = simulate(N, run, True)
    separate = simulate(N, run, False)
    for rank in range(N):
        for (sync, u1, p1), (_, u2, p2) in zip(joint[rank][0], separate[rank][0]):
            assert torch.equal(u1, u2)
            assert all(torch.equal(a, b) for a, b in zip(p1, p2))
        assert "sync" in joint[rank][1] and "sync_grad" not in joint[rank][1]
        assert "sync_params" not in joint[rank][1]


def test_exact_round_against_a_float64_oracle():
    """The averaged parameters are the float64 mean of every rank's (to fp32 rounding) and the
    same on every rank (the update's exact round is checked against tests/oracle.py by
    test_exchange.py; here it must equal the two-collective round's, above)."""
    results = simulate(N, run, True)
    step = PERIOD - 1                                   # the first exact round
    params = [data(r, step)[1] for r in range(N)]
    for i in range(2):
        mean = sum(p[i].double() for p in params) / N
        for rank in range(N):
            got = results[rank][0][step][2][i]
            assert results[rank][0][step][0]            # it was an exact round
            assert torch.allclose(got.double(), mean, rtol=1e-6, atol=1e-6)
            assert torch.equal(got, results[0][0][step][2][i])   # every rank the same


def test_ledger_counts_one_ring_allreduce_of_gradient_and_parameters():
    results = simulate(N, run, True)
    p_numel = 5 * 20 + 200
    for rank in range(N):
        up, down = ring_allreduce_bytes(D + p_numel, 4, N, rank)
        assert results[rank][1]["sync"] == 2 * (up + down)      # two exact rounds in four
