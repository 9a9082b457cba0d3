"""The byte ledger's ring-allreduce formula, against an independent count of a ring allreduce's
sends, and the places that use it (bench comm, train results, the Horovod-compatible optimizer's
counters, the exchange's allreduce pattern)."""
from __future__ import annotations

import pytest
import torch

from hvdcomp.bench.comm import Method, formula_bytes, ring_model_bytes
from hvdcomp.exchange_ledger import (ByteLedger, ring_allreduce_bytes, ring_allreduce_mean,
                                     ring_pieces)
from hvdcomp.train.results import psgd_bytes_per_step


def simulated_ring_sends(numel: int, item: int, n: int):
    """Bytes each rank sends in a ring allreduce, step by step: in reduce-scatter step s rank r
    sends piece (r − s) mod N to its right neighbour, in allgather step s piece (r + 1 − s)."""
    per = -(-numel // n)
    size = [max(0, min(per, numel - j * per)) * item for j in range(n)]
    up, down = [0] * n, [0] * n
    for s in range(n - 1):
        for r in range(n):
            up[r] += size[(r - s) % n]
            down[r] += size[(r + 1 - s) % n]
    return up, down


@pytest.mark.parametrize("numel,n", [(1000, 2), (1001, 3), (7, 4), (0, 3), (5, 8), (64, 1)])
def test_ring_bytes_match_a_simulated_ring(numel, n):
    up, down = simulated_ring_sends(numel, 4, n)
    # each rank's own piece: the ring sends every other piece up once; the allgather half sends
    # one piece N−1 times per rank in total; summed over ranks both models agree exactly
    ours = [ring_allreduce_bytes(numel, 4, n, r) for r in range(n)]
    assert sum(u for u, _ in ours) == sum(up)
    assert sum(d for _, d in ours) == sum(down)
    assert sum(u + d for u, d in ours) == 2 * (n - 1) * numel * 4
    if numel % n == 0:
        assert all(u == d == ring_allreduce_mean(numel * 4, n) for u, d in ours)


def test_mean_formula_is_the_average_over_ranks():
    for numel, n in [(1200, 2), (1200, 3), (999, 4)]:
        total = sum(sum(ring_allreduce_bytes(numel, 2, n, r)) for r in range(n))
        assert total / n == pytest.approx(2 * ring_allreduce_mean(numel * 2, n))
    assert ring_allreduce_mean(100, 1) == 0


def test_pieces_are_the_exchange_chunking_at_alignment_one():
    from hvdcomp.exchange import chunk_bounds
    for numel, n in [(10, 3), (0, 2), (65, 4)]:
        assert ring_pieces(numel, n) == chunk_bounds(numel, n, 1)


def test_ledger_counts_phases_and_rounds():
    ledger = ByteLedger(world_size=3, rank=1)
    ledger.count_ring_allreduce("a", 9, torch.float32)     # pieces of 3: up 2·12, down 2·12
    ledger.count_allgather("b", 2, torch.float64)          # 2 · 16 down
    assert (ledger.up, ledger.down) == (24, 24 + 32)
    assert ledger.by_phase == {"a": 48, "b": 32}
    ledger.close_round()
    assert ledger.last_round == {"up": 24, "down": 56}
    restored = ByteLedger(3, 1)
    restored.load_state_dict(ledger.state_dict())
    restored.count("c", up=1)
    restored.close_round()
    assert restored.last_round == {"up": 1, "down": 0}


def test_every_user_of_the_formula_agrees():
    d, n = 4096, 4
    assert psgd_bytes_per_step(4 * d, n) == 2 * ring_allreduce_mean(4 * d, n)
    assert formula_bytes(Method("horovod"), d, n) == (ring_allreduce_mean(4 * d, n),) * 2
    for r in range(n):
        assert ring_model_bytes(d, 4, n, r) == ring_allreduce_bytes(d, 4, n, r)


def test_exchange_allreduce_pattern_counts_with_the_ledger():
    from hvdcomp.algorithms import make_algorithm
    from hvdcomp.comm.simulator import simulate
    d, n = 1000, 3

    def body(comm):
        from hvdcomp.exchange import Exchange
        ex = Exchange(make_algorithm("psgd", up="none"), comm, pattern="allreduce")
        ex.exchange("b", torch.ones(d))
        ex.end_round()
        return ex.last_round_bytes

    results = simulate(n, body)
    for r, got in enumerate(results):
        up, down = ring_allreduce_bytes(d, 4, n, r)
        assert got == {"up": up, "down": down}
