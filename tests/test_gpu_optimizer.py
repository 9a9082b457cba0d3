"""``hvdcomp.DistributedOptimizer`` on a CUDA device without Horovod (marker ``gpu``; skipped
without CUDA; scripts/gpu-check.sh runs it): the whole step -- backward hooks filling buckets,
the exchange, LIEC's exact round with its model averaging, the wrapped SGD -- gives the CPU's
parameters, and never makes the host wait for the device.

One simulated rank: on CUDA, autograd runs every backward hook on one device thread per GPU,
which two simulated ranks in one process would share (a hook waiting for the other rank would
wait for itself). Several ranks: tests/test_gpu_exchange.py (the exchange alone)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from hvdcomp.comm import simulate

from gpu_support import GPU_MARKS, SyncFreeRegion, finite_check

pytestmark = GPU_MARKS

STEPS = 5
CHECKED = (3, 4)     # after the first steps (state, buffers); LIEC period 2: step 3 is exact
COMPRESSIONS = {"liec-topk": ("liec", {"up": "topk:ratio=0.3", "down": "topk:ratio=0.5",
                                       "period": 2}),
                "doublesqueeze-sign": ("doublesqueeze", {"up": "sign", "down": "sign"}),
                "psgd-none": ("psgd", {})}


def _train(comm, name, device, dtype, region=None):
    import hvdcomp
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(),
                                torch.nn.Linear(96, 10)).to(device, dtype)
    algorithm, options = COMPRESSIONS[name]
    optimizer = hvdcomp.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        named_parameters=model.named_parameters(),
        compression=hvdcomp.Compression.algorithm(algorithm, **options), comm=comm)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 64, generator=gen, dtype=dtype).to(device) for _ in range(STEPS)]
    for step, x in enumerate(batches):
        checked = region(comm.rank) if step in CHECKED and region else contextlib.nullcontext()
        with checked:
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    return [p.detach().to("cpu", copy=True) for p in model.parameters()]


@pytest.mark.parametrize("name", sorted(COMPRESSIONS))
@finite_check("auto")
def test_a_step_gives_the_cpus_parameters(name):
    on_gpu = simulate(1, _train, name, "cuda", torch.float64)[0]
    on_cpu = simulate(1, _train, name, "cpu", torch.float64)[0]
    for gpu, cpu in zip(on_gpu, on_cpu):
        torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(COMPRESSIONS))
@finite_check("auto")
def test_a_step_never_waits_for_the_device(name):
    simulate(1, _train, name, "cuda", torch.float32, SyncFreeRegion(1))
