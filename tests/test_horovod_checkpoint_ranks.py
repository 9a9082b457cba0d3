"""Checkpoints in Horovod's habits on real ranks, with LIEC-SGD (error feedback, and local models
that drift between exact rounds): one file written by rank 0 after
``optimizer.consolidate_state_dict()`` restores every rank exactly when rank 0 alone loads it and
``hvd.broadcast_parameters`` + ``hvd.broadcast_optimizer_state`` spread it. Also: wrapping
Horovod's own optimizer is refused at construction."""
import pytest
import torch

from multirank import run_ranks


def _model():
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _build():
    import hvdcomp
    model = _model()
    opt = hvdcomp.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model.named_parameters(),
        compression=hvdcomp.Compression.liec("sign", period=4), small_tensor_bytes=0)
    return model, opt


def _steps(model, opt, gen, count):
    for _ in range(count):
        x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _resume_by_broadcast():
    import horovod.torch as hvd
    import hvdcomp
    rank = hvd.rank()
    model, opt = _build()
    _steps(model, opt, torch.Generator().manual_seed(rank), 7)
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt = _build()
    gen = torch.Generator().manual_seed(rank)
    _steps(model, opt, gen, 3)          # not a multiple of the period: models differ by rank
    opt.consolidate_state_dict()
    file = {"model": model.state_dict(), "opt": opt.state_dict()} if rank == 0 else None
    model, opt = _build()
    if rank == 0:
        model.load_state_dict(file["model"])
        opt.load_state_dict(file["opt"])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    _steps(model, opt, gen, 4)
    resumed = [p.detach().clone() for p in model.parameters()]

    refused = ""
    try:
        hvdcomp.DistributedOptimizer(hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters()))
    except ValueError as exc:
        refused = str(exc)
    return straight, resumed, refused


@pytest.mark.mpi
def test_rank0_load_and_broadcast_restore_every_rank_exactly():
    results = run_ranks(_resume_by_broadcast, np=2, timeout=240)
    for straight, resumed, refused in results:
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b)
        assert "already a horovod DistributedOptimizer" in refused, refused
    # LIEC's local models differ between exact rounds: restoring rank 0's model everywhere
    # would not have been exact
    assert not torch.equal(results[0][0][0], results[1][0][0])
