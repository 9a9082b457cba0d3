"""hvdcomp.DistributedOptimizer on real Horovod ranks (mpirun and Gloo)."""
import sys
from pathlib import Path

import pytest
import torch

from multirank import launch_command, require, run_command, run_ranks

LAUNCHES = [pytest.param(np, ctl, marks=getattr(pytest.mark, ctl), id=f"{ctl}-{np}")
            for ctl in ("mpi", "gloo") for np in (2, 4)]


def _dyadic_training(steps=3):
    """A float64 linear layer on small-integer data with a power-of-two batch and learning rate.
    Every gradient, every partial sum of the ranks' gradients and every parameter is exactly
    representable, so the result does not depend on the order in which MPI or Gloo adds the
    ranks' contributions: any difference between the two optimizers is a real difference, not
    rounding. One layer, because a product of parameters doubles the significant bits each step:
    worked out with exact fractions, this layer needs at most 32 bits after 3 steps on 4 ranks,
    while the two-layer model this test used before needed 67 after 2 (more than float64's 53),
    so Horovod's fusion of the moment decided how a 4-rank Gloo sum rounded (CI saw it)."""
    return {which: _train_dyadic(which, steps) for which in ("horovod", "hvdcomp")}


def _train_dyadic(which, steps):
    import horovod.torch as hvd
    import hvdcomp

    gen = torch.Generator().manual_seed(7)
    model = torch.nn.Linear(6, 2).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-4, 5, p.shape, generator=gen).double() / 8)
    opt = torch.optim.SGD(model.parameters(), lr=2.0 ** -7)
    if which == "horovod":
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    else:
        opt = hvdcomp.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                           compression=hvdcomp.Compression.none)
    data = torch.Generator().manual_seed(hvd.rank())
    for _ in range(steps):
        x = torch.randint(-3, 4, (4, 6), generator=data).double()
        y = torch.randint(-3, 4, (4, 2), generator=data).double()
        opt.zero_grad()
        ((model(x) - y) ** 2).sum().div(4).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("np,controller", LAUNCHES)
def test_identity_compression_is_bit_identical_to_horovod(np, controller):
    results = run_ranks(_dyadic_training, np=np, controller=controller, timeout=240)
    ours = [r["hvdcomp"] for r in results]
    for rank in range(np):
        for a, b in zip(ours[rank], results[rank]["horovod"]):
            assert torch.equal(a, b)
    # and training moved the parameters (the comparison is not between two untouched models)
    assert not torch.equal(ours[0][0], _initial_first_layer())


def _initial_first_layer():
    gen = torch.Generator().manual_seed(7)
    return torch.randint(-4, 5, (2, 6), generator=gen).double() / 8


def _liec_real(steps=5):
    import hvdcomp
    from hvdcomp.comm import HorovodCommunicator
    sys.path.insert(0, str(Path(__file__).parent))
    from test_optimizer import train

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return train(HorovodCommunicator(), hvdcomp.Compression.liec("sign", period=3), steps=steps)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.mpi
def test_liec_sign_on_real_ranks_equals_the_simulator():
    """Three real ranks against the simulator. The exact round averages one buffer holding the
    gradient and the parameters (exchange_sync); on three ranks MPI's allreduce adds the three
    values of an element in an order that depends on where it sits in the buffer, the simulator
    in rank order, so values agree to float64 rounding (on two ranks, bit for bit:
    test_exchange_ranks). The compressed rounds in between must not amplify that difference."""
    import hvdcomp
    from hvdcomp.comm import simulate
    from test_optimizer import train

    real = run_ranks(_liec_real, np=3, controller="mpi", timeout=240)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        simulated = simulate(3, train, hvdcomp.Compression.liec("sign", period=3), steps=5)
    finally:
        torch.set_default_dtype(previous)
    for rank in range(3):
        for key in simulated[rank]["model"]:
            torch.testing.assert_close(real[rank]["model"][key], simulated[rank]["model"][key],
                                       rtol=1e-13, atol=1e-15)
        assert real[rank]["bytes"] == simulated[rank]["bytes"]


def _hooks_in_different_order():
    """Two branches whose backward passes run in opposite orders on even and odd ranks, with one
    bucket per parameter: the uplinks start in different orders on different ranks."""
    import horovod.torch as hvd
    import hvdcomp

    torch.manual_seed(0)
    left, right = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    params = (list(left.named_parameters(prefix="left"))
              + list(right.named_parameters(prefix="right")))
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD([p for _, p in params], lr=0.1), params,
                                       compression=hvdcomp.Compression.liec("sign"),
                                       bucket_bytes=1, small_tensor_bytes=0)
    x = torch.randn(4, 16)
    for _ in range(3):
        opt.zero_grad()
        losses = [left(x).square().sum(), right(x).abs().sum()]
        for loss in (losses if hvd.rank() % 2 == 0 else reversed(losses)):
            loss.backward()
        opt.step()
    return len(opt._reducer.buckets)


@pytest.mark.mpi
@pytest.mark.gloo
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_hooks_firing_in_different_orders_do_not_hang(controller):
    assert run_ranks(_hooks_in_different_order, np=2, controller=controller, timeout=120) == [4, 4]


def _stateful_to_horovods_optimizer():
    import horovod.torch as hvd
    import horovod.torch.optimizer as hvd_optimizer
    import hvdcomp

    untouched = hvd.DistributedOptimizer is hvd_optimizer.DistributedOptimizer
    model = torch.nn.Linear(3, 3)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   compression=hvdcomp.Compression.liec("sign"))
    try:
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
    except TypeError as exc:
        return untouched, str(exc)
    return untouched, "trained"


@pytest.mark.mpi
def test_stateful_compression_fails_in_horovods_optimizer_with_what_to_do():
    # importing hvdcomp leaves Horovod alone; the stateful compression itself refuses to be
    # used by Horovod's allreduce, at the first backward pass, and names the replacement
    results = run_ranks(_stateful_to_horovods_optimizer, np=2)
    for untouched, message in results:
        assert untouched
        assert "use hvdcomp.DistributedOptimizer(optimizer" in message, message
        assert "Compression.algorithm('liec'" in message, message


def _stateless_in_horovods_optimizer(kind):
    import horovod.torch as hvd
    import hvdcomp

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 8)
    comp = {"fp16": hvdcomp.Compression.fp16, "randomk": hvdcomp.Compression.randomk(0.25)}[kind]
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), compression=comp)
    x = torch.randn(8, 64) * (hvd.rank() + 1)
    model(x).square().sum().backward()
    opt.synchronize()
    return model.weight.grad.clone(), x


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["fp16", "randomk"])
def test_stateless_compressions_work_in_horovods_optimizer(kind):
    results = run_ranks(_stateless_in_horovods_optimizer, np=2, kind=kind)
    assert torch.equal(results[0][0], results[1][0])
    # the expected average, computed here from both ranks' inputs
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 8)
    grads = []
    for _, x in results:
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append(model.weight.grad.clone())
    dense = (grads[0] + grads[1]) / 2
    if kind == "fp16":
        assert torch.allclose(results[0][0], dense, rtol=2e-3, atol=1e-2)
    else:  # a quarter of the entries, the same ones on both ranks, exact; the rest zero
        kept = results[0][0] != 0
        assert 0.15 < kept.float().mean() < 0.35
        assert torch.allclose(results[0][0][kept], dense[kept], rtol=1e-6, atol=1e-6)


def _tensor_allreduce():
    import horovod.torch as hvd
    import hvdcomp

    x = torch.randn(1000, generator=torch.Generator().manual_seed(hvd.rank()))
    exact = hvdcomp.allreduce(x, name="x.exact")
    handle = hvdcomp.allreduce_async(x, name="x.liec", compression=hvdcomp.Compression.liec("sign"))
    liec = hvdcomp.synchronize(handle)
    return exact, liec, x


@pytest.mark.mpi
def test_compressed_allreduce_of_one_tensor():
    results = run_ranks(_tensor_allreduce, np=2)
    mean = (results[0][2] + results[1][2]) / 2
    assert torch.equal(results[0][0], mean) and torch.equal(results[1][0], mean)
    # LIEC with sign: C(v) plus the worker's own local error r = x - C(x); the average over
    # ranks of what the workers apply is the server's C(v) + mean r = mean x - e (error
    # conservation)
    applied = (results[0][1] + results[1][1]) / 2
    assert not torch.allclose(applied, mean)   # compression really happened ...
    # ... and the server error it left, mean - applied = v - C(v), is smaller than the signal:
    # sign compression of v is a δ-contraction, so ‖v − C(v)‖ < ‖v‖ ≤ ‖mean‖ + ‖mean r‖
    assert (mean - applied).norm() < mean.norm() + (results[0][2] - results[1][2]).norm()
    assert not torch.equal(results[0][1], results[1][1])   # each rank adds its own local error


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.mpi
def test_examples_plain_horovod_and_one_line_change_both_train():
    require("mpi")
    outputs = {}
    for script in ("train_horovod.py", "train_hvdcomp.py"):
        done = run_command(launch_command(2, "mpi", [sys.executable, str(EXAMPLES / script)]),
                           timeout=240)
        assert done.returncode == 0, done.stdout
        outputs[script] = done.stdout
    for out in outputs.values():
        accuracy = float(out.split("accuracy ")[1].split()[0])
        assert accuracy > 0.9, out
    changed = [line for line in _diff(EXAMPLES / "train_horovod.py", EXAMPLES / "train_hvdcomp.py")
               if not line.startswith(('"""', "    mpirun", "The only changes", '"""The same'))]
    assert len([l for l in changed if "DistributedOptimizer" in l]) == 1


def _diff(a, b):
    import difflib
    return [line[1:] for line in difflib.unified_diff(a.read_text().splitlines(),
                                                      b.read_text().splitlines(), lineterm="", n=0)
            if line.startswith("+") and not line.startswith("+++")]


@pytest.mark.gpu
def test_cuda_gradients_through_nccl_or_mpi():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    hvd = pytest.importorskip("horovod.torch", reason="Horovod is not installed (one GPU without "
                              "Horovod: tests/test_gpu_*.py cover the exchange)")
    if not (hvd.nccl_built() or hvd.cuda_built()):
        pytest.skip("Horovod was built without CUDA support (HOROVOD_GPU_OPERATIONS=NCCL)")
    results = run_ranks(_cuda_liec, np=1, timeout=240)
    assert results[0]["device"].startswith("cuda")
    assert results[0]["finite"]


def _cuda_liec():
    import hvdcomp
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 64).cuda()
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       model.named_parameters(),
                                       compression=hvdcomp.Compression.liec("sign"))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(32, 256, device="cuda")).square().mean().backward()
        opt.step()
    return {"device": str(model.weight.device),
            "finite": bool(torch.isfinite(model.weight).all().item())}
