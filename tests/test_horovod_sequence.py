"""The sequence of ordinary Horovod API uses that crashed Horovod's core with
``Compression.liec("sign")`` (issue 15): synchronize + clipping + skip_synchronize, GradScaler,
an LR scheduler, ``hvd.broadcast_optimizer_state``, a state_dict round trip through one rank-0
checkpoint — on 2 real MPI ranks, for a few hundred steps.

The crash came with Horovod's response cache churning: every collective's name held the round,
so each step brought new names and evicted old ones. Names are now stable, so the run must end
cleanly and Horovod must never print its eviction warning, even with a cache of 64 entries
(the old names filled that in some 20 steps).
"""
import sys
from pathlib import Path

import pytest
import torch

from multirank import launch_command, launcher_env, require, run_command

HERE = Path(__file__).resolve().parent


def _sequence(steps=120):
    import horovod.torch as hvd
    import hvdcomp
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvdcomp.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                       compression=hvdcomp.Compression.liec("sign", period=8))
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(hvd.rank())
    for step in range(steps):
        x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        opt.synchronize()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with opt.skip_synchronize():
            scaler.step(opt)
        scaler.update()
        scheduler.step()
        if step == steps // 2:   # rank 0 writes one checkpoint, every rank reads it
            opt.consolidate_state_dict()
            state = {"model": model.state_dict(), "opt": opt.state_dict()} \
                if hvd.rank() == 0 else None
            # stands in for a shared file (named: Horovod's default name is the object's type)
            state = hvd.broadcast_object(state, root_rank=0, name="checkpoint")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            hvd.broadcast_optimizer_state(opt, root_rank=0)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    print(f"rank {hvd.rank()} done: loss {loss.item():.4f} finite {finite} "
          f"lr {opt.param_groups[0]['lr']:.5f} rounds {opt.stats.rounds}", flush=True)


DRIVER = ("import sys; sys.path.insert(0, {here!r}); import horovod.torch as hvd; hvd.init(); "
          "import test_horovod_sequence as t; t._sequence(); hvd.shutdown()")


@pytest.mark.mpi
def test_issue_sequence_runs_cleanly_without_cache_eviction():
    require("mpi")
    env = launcher_env()
    env.update(HOROVOD_CACHE_CAPACITY="64", HOROVOD_LOG_LEVEL="warning")
    argv = [sys.executable, "-c", DRIVER.format(here=str(HERE))]
    done = run_command(launch_command(2, "mpi", argv), timeout=240, env=env)
    assert done.returncode == 0, done.stdout
    assert "evicted" not in done.stdout, done.stdout
    for rank in (0, 1):
        assert f"rank {rank} done" in done.stdout and "finite True" in done.stdout, done.stdout
    assert "lr 0.01250" in done.stdout       # 120 steps of StepLR(50, 0.5): 0.05 / 2**2
    assert "rounds 120" in done.stdout, done.stdout
