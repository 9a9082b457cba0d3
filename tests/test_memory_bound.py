"""Memory: between rounds a rank keeps at most its algorithm's own state plus one bucket of
scratch (issue 16, item 8), counted as the bytes of the tensors reachable from the exchange
(tracemalloc does not see torch's allocations); and every tensor an algorithm keeps across rounds
is declared state (Algorithm.state_fields), so checkpoints cannot miss one."""
from __future__ import annotations

import pytest
import torch

from hvdcomp.algorithms import make_algorithm
from hvdcomp.comm.simulator import simulate
from hvdcomp.exchange import Exchange
from hvdcomp.exchange_buffers import held_bytes

D = 1 << 14          # a bucket of fp32 elements, a multiple of the chunk alignment

CASES = [  # algorithm, up, down, pattern
    ("psgd", "sign", None, "two_phase"),
    ("psgd", "none", None, "allreduce"),
    ("liec", "sign", "sign", "two_phase"),
    ("liec", "sign", "sign", "allgather"),
    ("doublesqueeze", "blocksign:block=64", "sign", "two_phase"),
    ("neolithic", "sign", "sign", "two_phase"),
    ("memsgd", "topk:ratio=0.1", None, "two_phase"),
    ("memsgd", "none", None, "allreduce"),
    ("cser", "sign", None, "two_phase"),
    ("ef21", "topk:ratio=0.1", None, "two_phase"),
    ("ef21bc", "topk:ratio=0.1", "topk:ratio=0.1", "two_phase"),
    ("dgc", "dgc:ratio=0.01", None, "allgather"),
]


def _algorithm(name, up, down):
    hyper = {"steps_per_epoch": 100} if name == "dgc" else {}
    if name in ("liec", "cser"):
        hyper["period"] = 3                 # an exact round among the four below
    return make_algorithm(name, up=up, down=down, **hyper)


def _rounds(comm, name, up, down, pattern):
    algo = _algorithm(name, up, down)
    exchange = Exchange(algo, comm, pattern=pattern)
    for step in range(4):
        g = torch.randn(D, generator=torch.Generator().manual_seed(10 * comm.rank + step))
        exchange.finish(exchange.start("b", g))
        exchange.end_round()
    state = sum(t.numel() * t.element_size()
                for field in algo.state_fields for t in getattr(algo, field).values())
    undeclared = {attr: len(value) for attr, value in vars(algo).items()
                  if isinstance(value, dict) and attr not in algo.state_fields
                  and any(isinstance(v, torch.Tensor) for v in value.values())}
    return held_bytes(exchange), state, undeclared


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name,up,down,pattern", CASES)
def test_a_rank_keeps_its_state_plus_one_bucket(name, up, down, pattern, n):
    bucket = 4 * D
    for rank, (held, state, _) in enumerate(simulate(n, _rounds, name, up, down, pattern)):
        assert held <= state + bucket, (
            f"rank {rank} keeps {held / bucket:.2f} buckets: state {state / bucket:.2f} "
            f"+ scratch {(held - state) / bucket:.2f} (at most 1)")


@pytest.mark.parametrize("name,up,down,pattern", CASES)
def test_every_tensor_kept_across_rounds_is_declared_state(name, up, down, pattern):
    for _, _, undeclared in simulate(2, _rounds, name, up, down, pattern):
        assert not undeclared, f"{name} keeps tensors outside state_fields: {undeclared}"


def test_held_bytes_counts_each_storage_once_and_would_see_an_extra_buffer():
    class Holder:
        pass
    holder = Holder()
    big = torch.zeros(1000)
    holder.views = {"a": big[:10], "b": [big[500:], (big,)]}
    assert held_bytes(holder) == 4000
    holder.extra = torch.zeros(250, dtype=torch.float64)
    assert held_bytes(holder) == 6000


def test_a_kept_extra_bucket_breaks_the_bound():
    """The bound is not vacuous: LIEC-SGD keeping r_i in a buffer of its own (as it did before
    it wrote r_i over the exchange's C(g_i)) fails it."""
    from hvdcomp.algorithms.liec import LIEC
    from hvdcomp.exchange_buffers import ReusedBuffers

    class OwnBufferLIEC(LIEC):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._buffers = ReusedBuffers()

        def worker_sent(self, key, message, sent):
            own = self._buffers.like(key, "local_error", message)
            self.local_error[key] = torch.sub(message, sent, out=own)

    def rounds(comm):
        exchange = Exchange(OwnBufferLIEC(up="sign", down="sign", period=3), comm)
        for step in range(2):
            exchange.finish(exchange.start("b", torch.randn(D)))
            exchange.end_round()
        return held_bytes(exchange)

    for held in simulate(2, rounds):
        assert held > 4 * D // 2 + 4 * D          # server error (half) + one bucket
