"""Resident memory of each phase of a training step, on every step kind: PreAct-ResNet-18 (42.6
MiB of parameters), batch 8, SGD with momentum, under ``hvd.DistributedOptimizer`` or hvdcomp's
LIEC-SGD/sign with a short ``period`` so that exact rounds come often (docs/benchmarks.md, "Where
the extra peak memory goes").  Run under a launcher, one thread per rank:

    mpirun -np 2 -x OMP_NUM_THREADS=1 python scripts/step_memory.py horovod 10
    mpirun -np 2 -x OMP_NUM_THREADS=1 python scripts/step_memory.py liec:2 10

Rank 0 prints, for the last four steps, the peak and the final resident set of each phase
(sampled every 0.5 ms from /proc/self/statm) and its time on rank 0, then the process's
``ru_maxrss``.
"""
import os
import resource
import sys
import threading
import time

import horovod.torch as hvd
import torch

import hvdcomp
from hvdcomp.train.models import build_model

MIB = 2 ** 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakSampler:
    """The largest resident set seen since :meth:`reset`, sampled by a daemon thread."""

    def __init__(self):
        self.peak = resident()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            self.peak = max(self.peak, resident())
            time.sleep(0.0005)

    def reset(self):
        self.peak = resident()


def make_optimizer(method: str, model):
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if method == "horovod":
        return hvd.DistributedOptimizer(base, model.named_parameters())
    name, _, period = method.partition(":")
    if name != "liec":
        raise SystemExit(f"method: 'horovod' or 'liec:PERIOD', not {method!r}")
    return hvdcomp.DistributedOptimizer(
        base, model.named_parameters(),
        compression=hvdcomp.Compression.liec("sign", period=int(period or 32)))


def main(method: str, steps: int) -> None:
    hvd.init()
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10)
    optimizer = make_optimizer(method, model)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(hvd.rank()))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(hvd.rank()))
    sampler = PeakSampler()

    def step_once():
        with optimizer.skip_synchronize():
            optimizer.step()
    phases = [("zero_grad", optimizer.zero_grad),
              ("forward+backward",
               lambda: torch.nn.functional.cross_entropy(model(x), y).backward()),
              ("synchronize", optimizer.synchronize), ("step", step_once)]
    for step in range(steps):
        shown = hvd.rank() == 0 and step >= steps - 4
        reducer = getattr(optimizer, "_reducer", None)
        exact = reducer is not None and reducer.exchange.is_sync_step()
        if shown:
            print(f"step {step}{' (exact round)' if exact else ''}", flush=True)
        for name, run in phases:
            sampler.reset()
            began = time.perf_counter()
            run()
            took = time.perf_counter() - began
            time.sleep(0.01)
            if shown:
                print(f"  {name:17s} peak {sampler.peak / MIB:6.0f} MiB   after "
                      f"{resident() / MIB:6.0f} MiB   {1e3 * took:6.0f} ms", flush=True)
    if hvd.rank() == 0:
        print(f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10)
