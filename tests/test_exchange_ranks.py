"""The exchange on real ranks of both engines: Horovod (mpirun / horovodrun --gloo) and
torch.distributed (Gloo processes, tests/torchranks.py): exact averages bit for bit against the
engine's own allreduce (hvd.allreduce, torch.distributed.all_reduce), the single-server oracle,
simulator parity for every algorithm, and configuration mismatches.

Few and small: every launch costs seconds on a 2-core machine. Only the identity test and one
oracle test run on 2 and 4 ranks with both Horovod controllers and on 2 torch ranks; the others
on 2 ranks.
"""
from __future__ import annotations

import pytest
import torch

from multirank import run_ranks
from oracle import decoded, gradients, oracle, per_chunk, plain_chunks, run_exchange
from torchranks import run_torch_ranks

# (ranks, launcher): mpi and gloo are Horovod's controllers; torch is torch.distributed on Gloo
LAUNCHES = ([pytest.param(np, ctl, marks=getattr(pytest.mark, ctl), id=f"{ctl}-{np}")
             for ctl in ("mpi", "gloo") for np in (2, 4)]
            + [pytest.param(2, "torch", id="torch-2")])
ALGORITHMS = ["psgd", "memsgd", "doublesqueeze", "liec"]


def _comm(engine="horovod"):
    if engine == "torch":
        from hvdcomp.comm import TorchDistCommunicator
        return TorchDistCommunicator()
    from hvdcomp.comm import HorovodCommunicator
    return HorovodCommunicator()


def _launch(func, np, controller, timeout, **kwargs):
    """``func`` on ``np`` ranks of the engine ``controller`` names; its rank functions take
    ``engine``."""
    if controller == "torch":
        return run_torch_ranks(func, np=np, timeout=timeout, engine="torch", **kwargs)
    return run_ranks(func, np=np, controller=controller, timeout=timeout, engine="horovod",
                     **kwargs)


def _engine_average(comm, engine, tensor, name):
    """The engine's own average, not the communicator's: hvd.allreduce, or
    torch.distributed.all_reduce then · 1/size (Horovod's Average scaling)."""
    if engine == "torch":
        import torch.distributed as dist
        total = tensor.clone()
        dist.all_reduce(total)
        return total * (1.0 / comm.size)
    import horovod.torch as hvd
    return hvd.allreduce(tensor, op=hvd.Average, name=name)


# --- identity compressor: exact average ----------------------------------------------------------
def _identity_parity(d, steps, engine):
    comm = _comm(engine)
    # dyadic values (see oracle.gradients): the average is exact in float64 whatever order MPI,
    # Gloo or the exchange sum in, so bit-for-bit equality with hvd.allreduce is the right test
    grads = gradients(seed=21, steps=steps, n=comm.size, d=d, dyadic=True)
    mismatches = []
    for algorithm in ALGORITHMS:
        for pattern in ("two_phase", "allgather", "allreduce"):
            hyper = {"period": 2} if algorithm == "liec" else {}  # round 1 is a sync round
            got = run_exchange(comm, algorithm, grads, "none", "none", pattern, hyper, buckets=2)
            for t in range(steps):
                expected = _engine_average(comm, engine, grads[t, comm.rank],
                                           f"expected.{algorithm}.{pattern}.{t}")
                if not torch.equal(got["updates"][t], expected):
                    mismatches.append((algorithm, pattern, t))
    return mismatches


@pytest.mark.parametrize("np,controller", LAUNCHES)
def test_identity_compressor_exact_average_on_ranks(np, controller):
    # d = 130 with 4 ranks leaves empty chunks (64-element alignment): they must work too
    results = _launch(_identity_parity, np, controller, timeout=240, d=130, steps=3)
    assert results == [[]] * np


# --- oracle --------------------------------------------------------------------------------------
def _oracle_on_ranks(d, steps, engine):
    from hvdcomp.compressors import from_spec

    comm = _comm(engine)
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
    results = _launch(_oracle_on_ranks, np, controller, timeout=240, d=300, steps=4)
    for worst in results:
        assert set(worst) == {"doublesqueeze", "liec", "memsgd"}
        assert max(worst.values()) <= 1e-12, worst


# --- simulator and ranks agree -------------------------------------------------------------------
# LIEC with an exact round (its allreduce sums 2 values: commutative, so exact to the bit) and
# DoubleSqueeze with random-k, whose indices come from the exchange's shared per-round seeds.
SCENARIOS = {"liec": dict(up="sign", down="blocksign:block=64", hyper={"period": 3}),
             "doublesqueeze": dict(up="randomk:ratio=0.1", down="topk:ratio=0.1", hyper={})}


def _scenarios(comm=None, engine="horovod"):
    comm = comm or _comm(engine)
    grads = gradients(seed=9, steps=4, n=comm.size, d=333)
    results = {}
    for algorithm, s in SCENARIOS.items():
        out = run_exchange(comm, algorithm, grads, s["up"], s["down"], "two_phase", s["hyper"],
                           buckets=2)
        results[algorithm] = {k: out[k] for k in ("updates", "server_error", "bytes_up",
                                                  "bytes_down", "sync")}
    return results


@pytest.mark.parametrize("controller", [pytest.param("mpi", marks=pytest.mark.mpi), "torch"])
def test_simulator_and_ranks_identical(controller):
    from hvdcomp.comm import simulate

    real = _launch(_scenarios, 2, controller, timeout=180)
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


# --- every algorithm on torch ranks, bit for bit the simulator's ----------------------------------
# (name, up, down, hyperparameters); "rank" is filled with the worker's rank. The simulator runs
# the same steps (checked against the float64 oracle in tests/test_exchange.py), so equality to
# the bit says the torch engine moved every payload where the exchange meant it to go.
EVERY_ALGORITHM = [
    ("psgd", "topk:ratio=0.1", "sign", {}), ("memsgd", "sign", None, {}),
    ("doublesqueeze", "blocksign:block=64", "topk:ratio=0.1", {}),
    ("liec", "sign", "sign", {"period": 3}), ("neolithic", "sign", "sign", {}),
    ("cser", "sign", None, {"period": 2}), ("ef21", "topk:ratio=0.1", None, {}),
    ("ef21bc", "topk:ratio=0.1", "topk:ratio=0.1", {}),
    ("ef21sgdm", "topk:ratio=0.1", None, {}),
    ("ef21w", "topk:ratio=0.1", None, {"rank": None, "smoothness": [1.0, 3.0]}),
    ("ef21pp", "topk:ratio=0.1", None, {"rank": None}),
    ("ef21wpp", "topk:ratio=0.1", None, {"rank": None, "smoothness": [1.0, 3.0]}),
    ("dgc", "dgc:ratio=0.1", None, {"steps_per_epoch": 2, "warmup_epochs": 0})]


def _every_algorithm(comm=None, engine="horovod"):
    comm = comm or _comm(engine)
    grads = gradients(seed=3, steps=4, n=comm.size, d=333)
    out = {}
    for name, up, down, hyper in EVERY_ALGORITHM:
        hyper = {k: (comm.rank if k == "rank" else v) for k, v in hyper.items()}
        for pattern in (("allgather",) if name == "dgc" else ("two_phase", "allgather")):
            result = run_exchange(comm, name, grads, up, down, pattern, hyper, buckets=2)
            out[f"{name}/{pattern}"] = (result["updates"], result["bytes_up"],
                                        result["bytes_down"])
    return out


def test_every_algorithm_on_torch_ranks_equals_the_simulator():
    from hvdcomp.algorithms import ALGORITHMS
    from hvdcomp.comm import simulate

    # MoNNA owns its exchange; PowerSGD needs the tensors' shapes (the optimizer's set_shapes),
    # which run_exchange does not give: tests/test_ddp_hook.py runs it on torch ranks
    assert {case[0] for case in EVERY_ALGORITHM} >= set(ALGORITHMS) - {"monna", "powersgd_ef"}
    real = _launch(_every_algorithm, 2, "torch", timeout=300)
    simulated = simulate(2, _every_algorithm)
    for rank in range(2):
        assert real[rank].keys() == simulated[rank].keys()
        for case, (updates, up, down) in simulated[rank].items():
            theirs = real[rank][case]
            assert torch.equal(updates, theirs[0]), case
            assert (up, down) == theirs[1:], case


# --- mismatched configuration --------------------------------------------------------------------
def _mismatched(field, engine):
    from hvdcomp.algorithms import make_algorithm
    from hvdcomp.exchange import ConfigMismatchError, Exchange

    comm = _comm(engine)
    up = "topk:ratio=0.1" if comm.rank == 0 or field != "ratio" else "topk:ratio=0.2"
    d = 1000 + (comm.rank if field == "size" else 0)
    exchange = Exchange(make_algorithm("doublesqueeze", up=up), comm)
    try:
        exchange.prepare({"layer1": (d, torch.float32)})
        exchange.exchange("layer1", torch.ones(d))
    except ConfigMismatchError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("controller", [pytest.param("mpi", marks=pytest.mark.mpi), "torch"])
@pytest.mark.parametrize("field,named", [("ratio", "up"), ("size", "buckets.layer1")])
def test_mismatched_configuration_detected_on_ranks(field, named, controller):
    messages = _launch(_mismatched, 2, controller, timeout=120, field=field)
    assert messages[0] is not None and messages[0] == messages[1]
    assert named in messages[0] and "rank 0" in messages[0] and "rank 1" in messages[0]
