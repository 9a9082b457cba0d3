"""The pipelined finish (issue 16, "Overlap"): bucket k+1's server half (uplink waited for, server
steps, downlink launched) runs before bucket k's worker half (downlink waited for, decoded,
worker_update).  Only the order across buckets changes, so every value must be bit for bit the
bucket-by-bucket finish's, and so must the byte ledger: checked on the simulator for the
Exchange itself, and for hvdcomp.DistributedOptimizer on 2 real ranks of each engine (Horovod
over mpirun, torch.distributed over Gloo, which pairs collectives by launch order) with a model
cut into several buckets.
"""
from __future__ import annotations

import pytest
import torch

from hvdcomp.algorithms import make_algorithm
from hvdcomp.comm import simulate
from hvdcomp.comm.base import Handle
from hvdcomp.exchange import Exchange, finish_in_order
from multirank import run_ranks
from torchranks import run_torch_ranks

# algorithm, uplink, downlink, pattern: exact rounds (LIEC, period 3) and plain two-phase rounds,
# sign (with its bucket-norm allgather on the way down) and top-k; and the unsplit kinds
EXCHANGE_CASES = [
    ("liec", "sign", "sign", "two_phase"),
    ("liec", "topk:ratio=0.1", "topk:ratio=0.1", "two_phase"),
    ("doublesqueeze", "sign", "sign", "two_phase"),
    ("doublesqueeze", "topk:ratio=0.1", "topk:ratio=0.1", "two_phase"),
    ("liec", "sign", "sign", "allgather"),
    ("memsgd", "none", None, "allreduce"),
]
SIZES = (640, 256, 1000, 77)    # four buckets, the last shorter than a chunk on 3 ranks
ROUNDS = 4                      # LIEC's period 3: rounds 0 and 3 are exact


class RecordingComm:
    """A communicator that notes, in order, every allgather it launches and every wait on one:
    what shows that a downlink is launched before the previous bucket's is waited for."""

    def __init__(self, comm, log):
        self._comm, self.log = comm, log

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def allgather_async(self, tensor, name):
        self.log.append(("launch", name))
        handle = self._comm.allgather_async(tensor, name)

        def wait():
            self.log.append(("wait", name))
            return handle.wait()
        return Handle(wait, name)


def _algorithm(name, up, down):
    hyper = {"period": 3} if name == "liec" else {}
    return make_algorithm(name, up=up, down=down, **hyper)


def _rounds(comm, case, pipelined):
    name, up, down, pattern = case
    log = []
    exchange = Exchange(_algorithm(name, up, down), RecordingComm(comm, log), pattern=pattern)
    exchange.prepare({f"b{i}": (n, torch.float64) for i, n in enumerate(SIZES)})
    gen = torch.Generator().manual_seed(31 + comm.rank)
    updates = []
    for _ in range(ROUNDS):
        handles = [exchange.start(f"b{i}", torch.randn(n, generator=gen, dtype=torch.float64))
                   for i, n in enumerate(SIZES)]
        if pipelined:
            updates += list(finish_in_order([(exchange, h) for h in handles]))
        else:
            updates += [exchange.finish(h) for h in handles]
        exchange.end_round()
    return {"updates": updates, "bytes": dict(exchange.bytes_by_phase), "log": log,
            "state": exchange.algorithm.state_dict()}


@pytest.mark.parametrize("case", EXCHANGE_CASES, ids=lambda c: "-".join(filter(None, c)))
def test_pipelined_finish_equals_finish_bucket_by_bucket(case):
    for n in (2, 3):
        plain = simulate(n, _rounds, case, False)
        piped = simulate(n, _rounds, case, True)
        for a, b in zip(plain, piped):
            assert len(a["updates"]) == len(b["updates"]) == ROUNDS * len(SIZES)
            for x, y in zip(a["updates"], b["updates"]):
                assert x.shape == y.shape and torch.equal(x, y)
            assert a["bytes"] == b["bytes"]
            assert _equal_state(a["state"], b["state"])


def _equal_state(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_state(x, y) for x, y in zip(a, b))
    return a == b


def test_the_next_downlink_is_launched_before_this_one_is_waited_for():
    # the non-exact round 1 of DoubleSqueeze with sign: per bucket, the bucket-norm allgather
    # (waited for at once), then the downlink, launched; bucket k's downlink is waited for
    # only after bucket k+1's has been launched
    log = simulate(2, _rounds, EXCHANGE_CASES[2], True)[0]["log"]
    downs = [(event, name.split(".")[1]) for event, name in log if name.endswith(".down")]
    one_round = downs[:2 * len(SIZES)]
    assert one_round == [("launch", "b0"), ("launch", "b1"), ("wait", "b0"), ("launch", "b2"),
                         ("wait", "b1"), ("launch", "b3"), ("wait", "b2"), ("wait", "b3")]
    plain = simulate(2, _rounds, EXCHANGE_CASES[2], False)[0]["log"]
    plain_downs = [(e, n.split(".")[1]) for e, n in plain if n.endswith(".down")]
    assert plain_downs[:4] == [("launch", "b0"), ("wait", "b0"), ("launch", "b1"), ("wait", "b1")]


def test_the_halves_refuse_the_wrong_order():
    def body(comm):
        exchange = Exchange(_algorithm("doublesqueeze", "sign", "sign"), comm)
        handle = exchange.start("b", torch.ones(128, dtype=torch.float64))
        with pytest.raises(ValueError, match="finish_server"):
            exchange.finish_worker(handle)
        assert exchange.finish_server(handle) is handle and "downlink" in handle.pending
        with pytest.raises(ValueError, match="twice"):
            exchange.finish_server(handle)
        update = exchange.finish_worker(handle)
        with pytest.raises(ValueError, match="not in flight"):
            exchange.finish_worker(handle)
        exchange.end_round()
        return update
    a, b = simulate(2, body)
    assert torch.equal(a, b)


# --- hvdcomp.DistributedOptimizer on real ranks -------------------------------------------------
COMPRESSIONS = [("liec", "sign"), ("liec", "topk:ratio=0.1"), ("doublesqueeze", "sign"),
                ("doublesqueeze", "topk:ratio=0.1")]
STEPS = 4


def _model():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48),
                                torch.nn.Tanh(), torch.nn.Linear(48, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _train(comm, name, up, overlap):
    import hvdcomp

    model = _model()
    hyper = {"period": 3} if name == "liec" else {}
    compression = hvdcomp.Compression.algorithm(name, up=up, **hyper)
    opt = hvdcomp.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.named_parameters(),
        compression=compression, comm=comm, bucket_bytes=48 * 48 * 4, small_tensor_bytes=0)
    opt._reducer.overlap_downlink = overlap
    compressed = [b for b in opt._reducer.buckets if b.exchange is opt._reducer.exchange]
    data = torch.Generator().manual_seed(100 + comm.rank)
    for _ in range(STEPS):
        x, y = torch.randn(8, 20, generator=data), torch.randint(0, 3, (8,), generator=data)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()],
            "bytes": (opt.stats.bytes_up, opt.stats.bytes_down), "buckets": len(compressed)}


def _both_ways(engine):
    if engine == "torch":
        from hvdcomp.comm import TorchDistCommunicator
        comm = TorchDistCommunicator()
    else:
        from hvdcomp.comm import HorovodCommunicator
        comm = HorovodCommunicator()
    return {(name, up): (_train(comm, name, up, False), _train(comm, name, up, True))
            for name, up in COMPRESSIONS}


def _check(results):
    first = _model()
    for rank_results in results:
        for (name, up), (plain, piped) in rank_results.items():
            assert plain["buckets"] >= 3, (name, up, plain["buckets"])
            assert plain["bytes"] == piped["bytes"]
            for a, b in zip(plain["params"], piped["params"]):
                assert torch.equal(a, b), (name, up)
            assert not torch.equal(plain["params"][0], first[0].weight)   # training moved it


@pytest.mark.mpi
def test_pipelined_optimizer_equals_unpipelined_on_horovod_ranks():
    _check(run_ranks(_both_ways, np=2, controller="mpi", timeout=300, engine="horovod"))


def test_pipelined_optimizer_equals_unpipelined_on_torch_ranks():
    _check(run_torch_ranks(_both_ways, np=2, timeout=300, engine="torch"))
