"""The exchange on real Horovod ranks (mpirun / horovodrun --gloo): exact averages bit for bit
against hvd.allreduce, the single-server oracle, simulator parity, and configuration mismatches.

Few and small: every launch costs seconds on a 2-core machine. Only the identity test and one
oracle test run on 2 and 4 ranks with both controllers; the others on 2 ranks with MPI.
"""
from __future__ import annotations

import pytest
import torch

from multirank import run_ranks
from oracle import decoded, gradients, oracle, per_chunk, plain_chunks, run_exchange

LAUNCHES = [pytest.param(np, ctl, marks=getattr(pytest.mark, ctl), id=f"{ctl}-{np}")
            for ctl in ("mpi", "gloo") for np in (2, 4)]
ALGORITHMS = ["psgd", "memsgd", "doublesqueeze", "liec"]


def _comm():
    from hvdcomp.comm import HorovodCommunicator
    return HorovodCommunicator()


# --- identity compressor: exact average ----------------------------------------------------------
def _identity_parity(d, steps):
    import horovod.torch as hvd

    comm = _comm()
    # dyadic values (see oracle.gradients): the average is exact in float64 whatever order MPI,
    # Gloo or the exchange sum in, so bit-for-bit equality with hvd.allreduce is the right test
    grads = gradients(seed=21, steps=steps, n=comm.size, d=d, dyadic=True)
    mismatches = []
    for algorithm in ALGORITHMS:
        for pattern in ("two_phase", "allgather", "allreduce"):
            hyper = {"period": 2} if algorithm == "liec" else {}  # round 1 is a sync round
            got = run_exchange(comm, algorithm, grads, "none", "none", pattern, hyper, buckets=2)
            for t in range(steps):
                expected = hvd.allreduce(grads[t, comm.rank], op=hvd.Average,
                                         name=f"expected.{algorithm}.{pattern}.{t}")
                if not torch.equal(got["updates"][t], expected):
                    mismatches.append((algorithm, pattern, t))
    return mismatches


@pytest.mark.parametrize("np,controller", LAUNCHES)
def test_identity_compressor_exact_average_on_ranks(np, controller):
    # d = 130 with 4 ranks leaves empty chunks (64-element alignment): they must work too
    results = run_ranks(_identity_parity, np=np, controller=controller, timeout=240, d=130,
                        steps=3)
    assert results == [[]] * np


# --- oracle --------------------------------------------------------------------------------------
def _oracle_on_ranks(d, steps):
    from hvdcomp.compressors import from_spec

    comm = _comm()
    n = comm.size
    grads = gradients(seed=5, steps=steps, n=n, d=d)
    worst = {}
    cases = [("doublesqueeze", "blocksign:block=64", "topk:ratio=0.1"),
             ("liec", "blocksign:block=64", "blocksign:block=64"),
             ("memsgd", "topk:ratio=0.1", "none")]
    for algorithm, up, down in cases:
        def oracle_c(spec):
            c = decoded(from_spec(spec))
            return per_chunk(c, plain_chunks(d, n)) if spec.startswith("topk") else c
        hyper = {"period": 3} if algorithm == "liec" else {}
        got = run_exchange(comm, algorithm, grads, up, down, "two_phase", hyper, buckets=1)
        c_down = (lambda x: x) if algorithm == "memsgd" else oracle_c(down)
        expected = oracle(algorithm, grads, oracle_c(up), c_down, period=3)[:, comm.rank]
        worst[algorithm] = float((got["updates"] - expected).abs().max())
    return worst


@pytest.mark.parametrize("np,controller", LAUNCHES)
def test_sharded_exchange_matches_oracle_on_ranks(np, controller):
    results = run_ranks(_oracle_on_ranks, np=np, controller=controller, timeout=240, d=300,
                        steps=4)
    for worst in results:
        assert set(worst) == {"doublesqueeze", "liec", "memsgd"}
        assert max(worst.values()) <= 1e-12, worst


# --- simulator and ranks agree -------------------------------------------------------------------
# LIEC with an exact round (its allreduce sums 2 values: commutative, so exact to the bit) and
# DoubleSqueeze with random-k, whose indices come from the exchange's shared per-round seeds.
SCENARIOS = {"liec": dict(up="sign", down="blocksign:block=64", hyper={"period": 3}),
             "doublesqueeze": dict(up="randomk:ratio=0.1", down="topk:ratio=0.1", hyper={})}


def _scenarios(comm=None):
    comm = comm or _comm()
    grads = gradients(seed=9, steps=4, n=comm.size, d=333)
    results = {}
    for algorithm, s in SCENARIOS.items():
        out = run_exchange(comm, algorithm, grads, s["up"], s["down"], "two_phase", s["hyper"],
                           buckets=2)
        results[algorithm] = {k: out[k] for k in ("updates", "server_error", "bytes_up",
                                                  "bytes_down", "sync")}
    return results


@pytest.mark.mpi
def test_simulator_and_ranks_identical():
    from hvdcomp.comm import simulate

    real = run_ranks(_scenarios, np=2, controller="mpi", timeout=180)
    simulated = simulate(2, _scenarios)
    assert real[0]["liec"]["sync"] == [False, False, True, False]
    for rank in range(2):
        for algorithm in SCENARIOS:
            ours, theirs = simulated[rank][algorithm], real[rank][algorithm]
            assert torch.equal(ours["updates"], theirs["updates"]), algorithm
            assert (ours["bytes_up"], ours["bytes_down"]) == \
                (theirs["bytes_up"], theirs["bytes_down"])
            for t in range(4):
                for key, value in ours["server_error"][t].items():
                    other = theirs["server_error"][t][key]
                    assert (value is None and other is None) or torch.equal(value, other)


# --- mismatched configuration --------------------------------------------------------------------
def _mismatched(field):
    from hvdcomp.algorithms import make_algorithm
    from hvdcomp.exchange import ConfigMismatchError, Exchange

    comm = _comm()
    up = "topk:ratio=0.1" if comm.rank == 0 or field != "ratio" else "topk:ratio=0.2"
    d = 1000 + (comm.rank if field == "size" else 0)
    exchange = Exchange(make_algorithm("doublesqueeze", up=up), comm)
    try:
        exchange.prepare({"layer1": (d, torch.float32)})
        exchange.exchange("layer1", torch.ones(d))
    except ConfigMismatchError as exc:
        return str(exc)
    return None


@pytest.mark.mpi
@pytest.mark.parametrize("field,named", [("ratio", "up"), ("size", "buckets.layer1")])
def test_mismatched_configuration_detected_on_ranks(field, named):
    messages = run_ranks(_mismatched, np=2, controller="mpi", timeout=120, field=field)
    assert messages[0] is not None and messages[0] == messages[1]
    assert named in messages[0] and "rank 0" in messages[0] and "rank 1" in messages[0]
