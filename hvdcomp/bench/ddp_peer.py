"""``bench train --peer ddp``: PyTorch DistributedDataParallel on the same model, batch and ranks as
the other rows, as one rank of one row (:mod:`hvdcomp.bench.train_worker` calls :func:`run_ddp`).

Hooks, one row each: ``allreduce`` (DDP's built-in bucketed allreduce, no hook), ``fp16``
(``default_hooks.fp16_compress_hook``) and ``powersgd`` (``powerSGD_hook`` with
``PowerSGDState(matrix_approximation_rank=r, start_powerSGD_iter=2)``, the hook's other defaults:
error feedback, warm start, ``min_compression_rate=2``). PowerSGD's first 2 iterations are its
uncompressed start-up (the hook requires at least 2 with error feedback); they run before the
warm-up steps, untimed. Backend: Gloo (``bench train`` runs on the CPU; NCCL for a CUDA run is
not built yet). The process group is the bench's own
(``init_process_group`` over TCP at the address the launcher gives: rank 0's end of the
emulated link, or the loopback), created and destroyed in this process.

Bytes per step: each ``torch.distributed.all_reduce`` the hook launches is counted with the ring
model (reduce-scatter half up, allgather half down, :func:`hvdcomp.bench.comm.ring_model_bytes`);
DDP's built-in allreduce runs in C++ without a Python call, so its row is the ring model of the
whole fp32 gradient (what its buckets carry).
"""
from __future__ import annotations

import gc
import time
from datetime import timedelta
from typing import Dict, Optional

# imported here, not in the counter: a hook's allreduce may run in a callback thread, where a
# failing import would abort the process instead of raising
from .comm import ring_model_bytes
from .train_worker import Row, comm_modules, loss_of, model_and_batch, sgd
from ..comm.torchdist import destroy_process_groups

#: the hook's own uncompressed start-up iterations (the smallest it accepts with error feedback)
POWERSGD_START_ITER = 2


class AllreduceCounter:
    """Wraps ``torch.distributed.all_reduce`` (which the hooks look up at call time) to count the
    ring-model bytes of every allreduce this process launches."""

    def __init__(self, rank: int, size: int):
        import torch.distributed as dist
        self.dist, self.rank, self.size = dist, rank, size
        self.up = self.down = self.calls = 0
        self._original = dist.all_reduce

    def __enter__(self) -> "AllreduceCounter":
        def counted(tensor, *args, **kwargs):   # runs in Gloo's callback threads too
            up, down = ring_model_bytes(tensor.numel(), tensor.element_size(), self.size,
                                        self.rank)
            self.up, self.down, self.calls = self.up + up, self.down + down, self.calls + 1
            return self._original(tensor, *args, **kwargs)

        self.dist.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        self.dist.all_reduce = self._original


def init_group(spec: Dict[str, object], rank: int, size: int) -> str:
    import os

    import torch.distributed as dist

    if str(spec.get("device", "cpu")) != "cpu":   # bench train runs on the CPU only (for now)
        raise ValueError("the DDP peer runs on the CPU (Gloo); a CUDA run (NCCL) is not built")
    backend = "gloo"
    if spec.get("gloo_ifname"):
        os.environ["GLOO_SOCKET_IFNAME"] = str(spec["gloo_ifname"])
    dist.init_process_group(backend, init_method=f"tcp://{spec['master_addr']}:"
                                                 f"{spec['master_port']}",
                            rank=rank, world_size=size,
                            timeout=timedelta(seconds=float(spec.get("group_timeout_s", 300))))
    return backend


def wrap(model, spec: Dict[str, object]):
    """(the DDP model, hvdcomp's hook state or None) with the row's communication hook."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    if spec["kind"] == "hvdcomp-ddp":
        import hvdcomp
        import hvdcomp.ddp
        compression = hvdcomp.Compression.algorithm(spec["algorithm"], up=spec["up"])
        return ddp, hvdcomp.ddp.register(ddp, compression, pattern=spec.get("pattern"))
    hook = spec["hook"]
    if hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=int(spec["powersgd_rank"]),
            start_powerSGD_iter=POWERSGD_START_ITER)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif hook != "allreduce":
        raise ValueError(f"unknown DDP hook {hook!r}")
    return ddp, None


class DDPRunner:
    """One DDP row's model, hook and batch; :meth:`step` returns one timed row (step time only:
    DDP communicates inside ``backward()``), with hvdcomp's ``compress`` time for its hook."""

    def __init__(self, spec: Dict[str, object], rank: int, size: int,
                 counter: AllreduceCounter):
        model, self.inputs, self.labels = model_and_batch(spec, rank)
        self.ddp, self.state = wrap(model, spec)
        self.optimizer = sgd(self.ddp)
        self.numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.rank, self.size, self.counter = rank, size, counter
        self.source = ("optimizer counters" if self.state is not None
                       else "ring model" if spec.get("hook") == "allreduce" else "hook calls")

    @property
    def stats(self):
        return None if self.state is None else self.state.reducer.stats

    @property
    def period(self) -> Optional[int]:
        return None if self.state is None else getattr(self.state.reducer.algorithm, "period",
                                                       None)

    def next_is_exact(self) -> bool:
        return self.state is not None and self.state.reducer.exchange.is_sync_step()

    def jump_to_exact_round(self) -> None:
        algorithm, period = self.state.reducer.algorithm, self.period
        algorithm.step += (period - 1 - algorithm.step % period) % period

    def step(self) -> Row:
        stats, counter = self.stats, self.counter
        before = (stats.time_compress, stats.bytes_up, stats.bytes_down) if stats \
            else (0.0, counter.up, counter.down)
        t0 = time.perf_counter()
        self.optimizer.zero_grad()
        loss_of(self.ddp, self.inputs, self.labels).backward()   # DDP's allreduces finish here
        self.optimizer.step()
        elapsed = time.perf_counter() - t0
        if stats:
            return [elapsed, None, stats.time_compress - before[0], None,
                    float(stats.bytes_up - before[1]), float(stats.bytes_down - before[2])]
        if self.source == "hook calls":
            return [elapsed, None, None, None, float(counter.up - before[1]),
                    float(counter.down - before[2])]
        up, down = ring_model_bytes(self.numel, 4, self.size, self.rank)
        return [elapsed, None, None, None, float(up), float(down)]


def run_ddp(spec: Dict[str, object], rank: int, size: int) -> Dict[str, object]:
    import torch.distributed as dist

    from .train_horovod import timed_steps

    init_group(spec, rank, size)
    with AllreduceCounter(rank, size) as counter:
        runner = DDPRunner(spec, rank, size, counter)
        if spec.get("hook") == "powersgd":   # the hook's uncompressed start-up, untimed
            for _ in range(POWERSGD_START_ITER):
                runner.step()
        compressed, exact, period = timed_steps(runner, int(spec["warmup"]), int(spec["steps"]))
    loaded = comm_modules()
    bucket = None
    if runner.state is not None:
        buckets = [b for b in runner.state.reducer.buckets
                   if b.exchange is runner.state.reducer.exchange]
        bucket = max((4 * b.numel for b in buckets), default=None)
    record = {"compressed": compressed, "exact": exact, "period": period,
              "parameters": runner.numel, "bytes_source": runner.source, "bucket_bytes": bucket,
              "comm_modules": loaded}
    # DDP and hvdcomp's hook hold the process group: release them before it is destroyed, so
    # that no Gloo work or buffer outlives it into the interpreter's shutdown
    del runner
    gc.collect()
    dist.barrier()
    destroy_process_groups()
    return record
