"""``bench train --peer ddp``: PyTorch DistributedDataParallel on the same model, batch and ranks as
the other rows, as one rank of one row (:mod:`hvdcomp.bench.train_worker` calls :func:`run_ddp`).

Hooks, one row each: ``allreduce`` (DDP's built-in bucketed allreduce, no hook), ``fp16``
(``default_hooks.fp16_compress_hook``) and ``powersgd`` (``powerSGD_hook`` with
``PowerSGDState(matrix_approximation_rank=r, start_powerSGD_iter=2)``, the hook's other defaults:
error feedback, warm start, ``min_compression_rate=2``). PowerSGD's first 2 iterations are its
uncompressed start-up (the hook requires at least 2 with error feedback); they run before the
warm-up steps, untimed. Backend: Gloo on CPU, NCCL on CUDA. The process group is the bench's own
(``init_process_group`` over TCP at the address the launcher gives: rank 0's end of the
emulated link, or the loopback), created and destroyed in this process.

Bytes per step: each ``torch.distributed.all_reduce`` the hook launches is counted with the ring
model (reduce-scatter half up, allgather half down, :func:`hvdcomp.bench.comm.ring_model_bytes`);
DDP's built-in allreduce runs in C++ without a Python call, so its row is the ring model of the
whole fp32 gradient (what its buckets carry).
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Dict, List

from .train_worker import Row, comm_modules, loss_of, model_and_batch, sgd

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
        def counted(tensor, *args, **kwargs):
            from .comm import ring_model_bytes
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

    device = str(spec.get("device", "cpu"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if spec.get("gloo_ifname"):
        os.environ["GLOO_SOCKET_IFNAME"] = str(spec["gloo_ifname"])
    dist.init_process_group(backend, init_method=f"tcp://{spec['master_addr']}:"
                                                 f"{spec['master_port']}",
                            rank=rank, world_size=size,
                            timeout=timedelta(seconds=float(spec.get("group_timeout_s", 300))))
    return backend


def wrap(model, spec: Dict[str, object]):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
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
    return ddp


def run_ddp(spec: Dict[str, object], rank: int, size: int) -> Dict[str, object]:
    import torch.distributed as dist

    init_group(spec, rank, size)
    model, inputs, labels = model_and_batch(spec, rank)
    ddp = wrap(model, spec)
    optimizer = sgd(ddp)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counted = spec["hook"] != "allreduce"
    with AllreduceCounter(rank, size) as counter:
        def step() -> Row:
            up, down = counter.up, counter.down
            t0 = time.perf_counter()
            optimizer.zero_grad()
            loss_of(ddp, inputs, labels).backward()   # DDP's allreduces finish in here
            optimizer.step()
            elapsed = time.perf_counter() - t0
            if counted:
                return [elapsed, None, None, None, float(counter.up - up),
                        float(counter.down - down)]
            from .comm import ring_model_bytes
            return [elapsed, None, None, None, *map(float, ring_model_bytes(numel, 4, size, rank))]

        start = POWERSGD_START_ITER if spec["hook"] == "powersgd" else 0
        for _ in range(start + int(spec["warmup"])):
            step()
        rows: List[Row] = [step() for _ in range(int(spec["steps"]))]
    loaded = comm_modules()
    dist.barrier()
    dist.destroy_process_group()
    return {"compressed": rows, "exact": [], "period": None, "parameters": numel,
            "bytes_source": "hook calls" if counted else "ring model", "comm_modules": loaded}
