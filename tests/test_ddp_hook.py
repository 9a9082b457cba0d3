"""hvdcomp's DDP communication hook (hvdcomp/ddp.py) on real 2-rank Gloo processes: psgd/none
equals DDP's default allreduce to the last bit; every other algorithm equals
hvdcomp.DistributedOptimizer to the last bit on the same seed, both over the torch communicator
in the same processes and over Horovod under mpirun (another library and launcher); LIEC-SGD's
exact rounds average the replicas; the state pickles into a checkpoint and resumes exactly;
what cannot be honoured is refused up front."""
from __future__ import annotations

import io

import pytest
import torch

from torchranks import run_torch_ranks

STEPS = 5
LR = 0.05
# hvdcomp's buckets (8 KiB) and DDP's (bucket_cap_mb) cut the model differently on purpose
BUCKET_BYTES = 8192
DDP_BUCKET_MB = 0.01


def _net(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 4)).to(device)


def _batch(step, rank):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 16, generator=generator), torch.randint(0, 4, (16,),
                                                                   generator=generator)


def _compression(case, rank=0):
    import hvdcomp
    C = hvdcomp.Compression
    if case.startswith("every/"):      # test_exchange_ranks' settings for each algorithm
        from test_exchange_ranks import EVERY_ALGORITHM
        name, up, down, hyper = next(c for c in EVERY_ALGORITHM if c[0] == case[len("every/"):])
        hyper = {k: (rank if k == "rank" else v) for k, v in hyper.items()}
        return C.algorithm(name, up=up, down=down, **hyper)
    return {"psgd/none": lambda: C.psgd(),
            "liec/sign": lambda: C.liec("sign", period=3),
            "doublesqueeze/topk": lambda: C.doublesqueeze("topk:ratio=0.1"),
            "memsgd/sign": lambda: C.memsgd("sign"),
            "ef21/topk": lambda: C.ef21("topk:ratio=0.1"),
            "dgc/dgc": lambda: C.dgc("dgc:ratio=0.1", steps_per_epoch=2, warmup_epochs=0),
            "powersgd_ef": lambda: C.powersgd_ef(),
            }[case]()


def _train(model, optimizer, rank, steps, first=0, device="cpu"):
    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(first, first + steps):
        x, y = (t.to(device) for t in _batch(step, rank))
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()


def _ddp(net, **hook):
    from torch.nn.parallel import DistributedDataParallel

    import hvdcomp.ddp
    model = DistributedDataParallel(net, bucket_cap_mb=DDP_BUCKET_MB)
    state = hvdcomp.ddp.register(model, **hook) if hook else None
    return model, state


def _params(net):
    return [p.detach().cpu().clone() for p in net.parameters()]


# --- parity --------------------------------------------------------------------------------------
def _ddp_hook_and_optimizer(case, device="cpu"):
    import torch.distributed as dist

    import hvdcomp
    from hvdcomp.comm import TorchDistCommunicator

    rank = dist.get_rank()
    net = _net(device=device)
    model, state = _ddp(net, compression=_compression(case), bucket_bytes=BUCKET_BYTES)
    _train(model, torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9), rank, STEPS,
           device=device)
    out = {"hook": _params(net), "bytes": (state.stats.bytes_up, state.stats.bytes_down)}
    # the Horovod engine's optimizer on the same seed
    net2 = _net(device=device)
    optimizer = hvdcomp.DistributedOptimizer(
        torch.optim.SGD(net2.parameters(), lr=LR, momentum=0.9),
        named_parameters=net2.named_parameters(), compression=_compression(case),
        comm=TorchDistCommunicator(), bucket_bytes=BUCKET_BYTES)
    _train(net2, optimizer, rank, STEPS, device=device)
    out["optimizer"] = _params(net2)
    out["optimizer_bytes"] = (optimizer.stats.bytes_up, optimizer.stats.bytes_down)
    # DDP's own default allreduce: the uncompressed reference
    net3 = _net(device=device)
    model3, _ = _ddp(net3)
    _train(model3, torch.optim.SGD(net3.parameters(), lr=LR, momentum=0.9), rank, STEPS,
           device=device)
    out["ddp"] = _params(net3)
    return out


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_psgd_none_equals_ddp_default_hook_to_the_last_bit():
    results = run_torch_ranks(_ddp_hook_and_optimizer, np=2, timeout=240, case="psgd/none")
    for out in results:
        assert _equal(out["hook"], out["ddp"])
        assert _equal(out["hook"], out["optimizer"])
    assert _equal(results[0]["hook"], results[1]["hook"])


@pytest.mark.parametrize("case", ["liec/sign", "doublesqueeze/topk", "memsgd/sign",
                                  "ef21/topk", "dgc/dgc", "powersgd_ef"])
def test_algorithms_equal_the_optimizer_on_the_same_seed(case):
    results = run_torch_ranks(_ddp_hook_and_optimizer, np=2, timeout=300, case=case)
    for out in results:
        assert _equal(out["hook"], out["optimizer"]), case
        assert out["bytes"] == out["optimizer_bytes"]
        # independent of hvdcomp: compression really happened (not DDP's plain average) ...
        assert not _equal(out["hook"], out["ddp"])
        assert 0 < out["bytes"][0] < results[0]["bytes"][0] * 10
    # LIEC-SGD's replicas drift between exact rounds (steps 4 and 5 follow the exact 3rd; see
    # test_liec_exact_round_averages_the_replicas); every other method keeps one model
    assert _equal(results[0]["hook"], results[1]["hook"]) == (case != "liec/sign")


# --- against the Horovod engine itself (mpirun, Horovod's collectives) ----------------------------
def _every_case():
    """Every registered five-step algorithm (MoNNA owns its exchange of models: no hook), with
    test_exchange_ranks' compressors and settings, plus PowerSGD as a method."""
    from test_exchange_ranks import EVERY_ALGORITHM
    return [f"every/{case[0]}" for case in EVERY_ALGORITHM] + ["powersgd_ef"]


HOROVOD_CASES = _every_case()


def _hook_runs(cases):
    import torch.distributed as dist

    results = {}
    for case in cases:
        net = _net()
        model, _ = _ddp(net, compression=_compression(case, dist.get_rank()),
                        bucket_bytes=BUCKET_BYTES)
        _train(model, torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9), dist.get_rank(),
               STEPS)
        results[case] = _params(net)
    return results


def _horovod_runs(cases):
    import horovod.torch as hvd

    import hvdcomp
    results = {}
    for case in cases:
        net = _net()
        optimizer = hvdcomp.DistributedOptimizer(
            torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9),
            named_parameters=net.named_parameters(), compression=_compression(case, hvd.rank()),
            bucket_bytes=BUCKET_BYTES)
        _train(net, optimizer, hvd.rank(), STEPS)
        results[case] = _params(net)
    return results


@pytest.mark.mpi
def test_hook_on_torch_ranks_equals_the_horovod_engine_under_mpirun():
    """Two launchers, two libraries (Gloo processes with DDP; mpirun with Horovod's
    collectives): the same parameters to the last bit."""
    from multirank import run_ranks

    hook = run_torch_ranks(_hook_runs, np=2, timeout=300, cases=HOROVOD_CASES)
    horovod = run_ranks(_horovod_runs, np=2, controller="mpi", timeout=300, cases=HOROVOD_CASES)
    for rank in range(2):
        for case in HOROVOD_CASES:
            assert _equal(hook[rank][case], horovod[rank][case]), (rank, case)


def _cases_on(cases, device):
    return {case: _ddp_hook_and_optimizer(case, device) for case in cases}


@pytest.mark.gpu
def test_hook_on_one_nccl_rank_equals_the_optimizer():
    """A single-rank NCCL group on one GPU, CUDA parameters: the hook's exchange (and, for
    psgd/none, DDP's own allreduce) against hvdcomp.DistributedOptimizer, to the last bit."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cases = ["psgd/none", "liec/sign", "dgc/dgc"]
    results = run_torch_ranks(_cases_on, np=1, backend="nccl", timeout=240, cases=cases,
                              device="cuda")[0]
    for case, out in results.items():
        assert _equal(out["hook"], out["optimizer"]), case
    assert _equal(results["psgd/none"]["hook"], results["psgd/none"]["ddp"])


def _liec_replicas(steps):
    import torch.distributed as dist

    import hvdcomp
    rank = dist.get_rank()
    net = _net()
    model, _ = _ddp(net, compression=hvdcomp.Compression.liec("sign", period=3),
                    bucket_bytes=BUCKET_BYTES)
    _train(model, torch.optim.SGD(net.parameters(), lr=LR), rank, steps)
    return _params(net)


@pytest.mark.parametrize("steps,same", [(2, False), (3, True)])
def test_liec_exact_round_averages_the_replicas(steps, same):
    """Plain SGD: after the exact round (the 3rd) the ranks' models are one, to the bit (the
    parameters were averaged, then the same exact update applied); before it they drift."""
    results = run_torch_ranks(_liec_replicas, np=2, timeout=180, steps=steps)
    assert _equal(results[0], results[1]) == same


# --- checkpoint ----------------------------------------------------------------------------------
def _checkpoint_resume(case):
    import torch.distributed as dist

    rank = dist.get_rank()
    net = _net()
    model, state = _ddp(net, compression=_compression(case), bucket_bytes=BUCKET_BYTES)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    _train(model, optimizer, rank, 2)
    buffer = io.BytesIO()   # each rank saves its own: the error feedback differs per rank
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "hook": state}, buffer)
    _train(model, optimizer, rank, 3, first=2)
    straight = _params(net)
    # a fresh process would do this: load, wrap, attach the unpickled state
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    net2 = _net(seed=99)
    net2.load_state_dict(saved["model"])
    model2, _ = _ddp(net2, state=saved["hook"])
    optimizer2 = torch.optim.SGD(net2.parameters(), lr=LR, momentum=0.9)
    optimizer2.load_state_dict(saved["optimizer"])
    _train(model2, optimizer2, rank, 3, first=2)
    return _equal(straight, _params(net2)), "process_group" in str(saved["hook"].__getstate__())


@pytest.mark.parametrize("case", ["liec/sign", "memsgd/sign"])
def test_state_pickles_into_a_checkpoint_and_resumes_exactly(case):
    results = run_torch_ranks(_checkpoint_resume, np=2, timeout=240, case=case)
    assert results == [(True, False)] * 2


# --- refused up front ----------------------------------------------------------------------------
@pytest.mark.parametrize("make,message", [
    (lambda C: None, "needs compression="),
    (lambda C: C.fp16, "Horovod's Compressor interface"),
    (lambda C: C.randomk(0.1), "Horovod's Compressor interface"),
    (lambda C: "sign", "pass a compression object")])
def test_compressions_the_hook_cannot_honour_are_refused(make, message):
    import hvdcomp
    from hvdcomp.ddp import HvdcompState

    with pytest.raises(TypeError, match=message):
        HvdcompState(_net(), make(hvdcomp.Compression))


def test_register_needs_a_ddp_model():
    import hvdcomp
    import hvdcomp.ddp

    with pytest.raises(TypeError, match="DistributedDataParallel"):
        hvdcomp.ddp.register(_net(), hvdcomp.Compression.liec())
