"""LIEC-SGD's exact round with the parameters given to Exchange.start (as the optimizer does): the
gradient averaged in place in ``update_into``, the parameters in place at ``finish``; the same
values bit for bit as averaging the parameters apart (Exchange.average_parameters), checked
against a float64 oracle of the formulas; the ledger counts a ring allreduce of each tensor."""
from __future__ import annotations

import pytest
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
        # joint: as the optimizer calls it (its bucket buffer lent as update_into)
        update = (ex.finish(ex.start("b", grad, params=params, update_into=grad.clone()))
                  if joint else ex.finish(ex.start("b", grad)))
        if sync and not joint:
            ex.average_parameters(params)
        ex.end_round()
        out.append((sync, update.clone(), [p.clone() for p in params]))
    return out, dict(ex.bytes_by_phase), (ex.bytes_up, ex.bytes_down)


def test_parameters_given_to_start_give_the_separate_averages_bit_for_bit():
    joint = simulate(N, run, True)
    separate = simulate(N, run, False)
    for rank in range(N):
        for (sync, u1, p1), (_, u2, p2) in zip(joint[rank][0], separate[rank][0]):
            assert torch.equal(u1, u2)
            assert all(torch.equal(a, b) for a, b in zip(p1, p2))
        assert joint[rank][1] == separate[rank][1]     # the same phases and bytes


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


def test_ledger_counts_a_ring_allreduce_of_the_gradient_and_one_per_parameter():
    results = simulate(N, run, True)
    for rank in range(N):
        grad_bytes = sum(ring_allreduce_bytes(D, 4, N, rank))
        param_bytes = sum(sum(ring_allreduce_bytes(n, 4, N, rank)) for n in (5 * 20, 200))
        assert results[rank][1]["sync_grad"] == 2 * grad_bytes     # two exact rounds in four
        assert results[rank][1]["sync_params"] == 2 * param_bytes


def test_parameters_of_any_dtype_and_layout_are_averaged_in_place():
    """Each parameter is averaged in its own dtype and storage: float64 parameters of a float32
    gradient (once left out without a word), a bucket that mixes dtypes, and a parameter that is
    not contiguous (averaged through a copy, written back)."""
    def ranks(comm):
        ex = Exchange(make_algorithm("liec", up="sign", period=1), comm)
        params = [torch.full((3,), float(comm.rank), dtype=torch.float64),
                  torch.full((2,), 2.0 * comm.rank),
                  torch.full((4, 3), 4.0 * comm.rank).t()]
        storages = [p.data_ptr() for p in params]
        ex.finish(ex.start("b", torch.ones(D), params=params))
        ex.end_round()
        assert [p.data_ptr() for p in params] == storages
        return params
    for averaged in simulate(2, ranks):
        assert torch.equal(averaged[0], torch.full((3,), 0.5, dtype=torch.float64))
        assert torch.equal(averaged[1], torch.full((2,), 1.0))
        assert torch.equal(averaged[2], torch.full((3, 4), 2.0))


# --- the server error: each owner's chunk folded in and broadcast, not allgathered --------------
def _exact_round_and_gathered_reference(comm, d: int):
    ex = Exchange(make_algorithm("liec", up="sign", period=2), comm)
    first = torch.randn(d, generator=torch.Generator().manual_seed(comm.rank))
    ex.finish(ex.start("b", first))                     # a compressed round sets e
    ex.end_round()
    own = ex.algorithm.server_error["b"].clone()        # this rank's chunk of e
    grad = torch.randn(d, generator=torch.Generator().manual_seed(100 + comm.rank))
    # the reference: the whole bucket's ḡ + e, with e allgathered (as before 30 Nov 2026)
    expected = comm.allreduce(grad, "ref.mean") + comm.allgather(own, "ref.error")
    assert ex.is_sync_step()
    update = ex.finish(ex.start("b", grad, update_into=grad.clone()))
    return update, expected, ex.algorithm.server_error.get("b")


@pytest.mark.parametrize("d", [300, 100])    # N = 3: uneven chunks (128, 128, 44); one empty
def test_the_exact_round_adds_the_gathered_server_error_bit_for_bit(d):
    results = simulate(N, _exact_round_and_gathered_reference, d)
    for update, expected, error_after in results:
        assert torch.equal(update, expected)
        assert torch.equal(update, results[0][0])       # every rank the same update
        assert error_after is None                      # e ← 0
