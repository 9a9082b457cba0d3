"""One rank of one ``bench train`` row: ``python -m hvdcomp.bench.train_worker SPEC.json``.

Started N times by :mod:`hvdcomp.bench.train_launch` (under ``mpirun``, which is only the process
starter here: the rank and world size come from its environment). The spec says which row; the
rank writes its record, ``<out_dir>/<tag>.rank<r>.json``, and exits. Records hold raw per-step
timings; :func:`hvdcomp.bench.train.combine` makes the row.

The compute-only row imports nothing but torch and the model: no Horovod, no MPI, no
``torch.distributed`` process group. ``comm_modules`` in the record lists the communication
modules that were loaded in the process when it finished, so the claim can be checked.
"""
from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..horovod_settings import SETTINGS

Row = List[Optional[float]]     # [step, compute, compress, comm, bytes_up, bytes_down]


def rank_and_size() -> Tuple[int, int]:
    from ..train.config import detect_launcher
    launcher = detect_launcher()
    return int(launcher["rank"]), int(launcher["world_size"])


def model_and_batch(spec: Dict[str, object], rank: int):
    """The row's model (same initial weights on every rank and for every row) and this rank's
    fixed synthetic batch."""
    from ..train.models import build_model, needs_images

    size, classes = int(spec["image_size"]), int(spec["num_classes"])
    torch.manual_seed(int(spec["seed"]))
    shape = (3, size, size) if needs_images(spec["model"]) else (3 * size ** 2,)
    model = build_model(spec["model"], shape, classes)
    generator = torch.Generator().manual_seed(int(spec["seed"]) + 1000 * (rank + 1))
    inputs = torch.randn(int(spec["batch_size"]), *shape, generator=generator)
    labels = torch.randint(classes, (int(spec["batch_size"]),), generator=generator)
    return model, inputs, labels


def sgd(model) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def loss_of(model, inputs, labels) -> torch.Tensor:
    return F.cross_entropy(model(inputs), labels)


def run_compute_only(spec: Dict[str, object], rank: int, size: int) -> Dict[str, object]:
    model, inputs, labels = model_and_batch(spec, rank)
    optimizer = sgd(model)

    def step() -> Row:
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss_of(model, inputs, labels).backward()
        optimizer.step()
        elapsed = time.perf_counter() - t0
        return [elapsed, elapsed, 0.0, 0.0, 0.0, 0.0]

    for _ in range(int(spec["warmup"])):
        step()
    rows = [step() for _ in range(int(spec["steps"]))]
    return {"compressed": rows, "exact": [], "period": None, "bytes_source": "none",
            "parameters": _parameters(model)}


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_memory(device: str = "cpu") -> Tuple[int, Optional[int]]:
    """(peak resident set of this process in bytes, CUDA max_memory_allocated or None)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
    if device.startswith("cuda") and torch.cuda.is_available():
        return rss, int(torch.cuda.max_memory_allocated())
    return rss, None


def comm_modules() -> List[str]:
    """Communication libraries loaded in this process (top-level names), and ``torch.distributed``
    when a process group is initialised."""
    tops = {name.split(".")[0] for name in sys.modules}
    names = sorted(tops & {"horovod", "mpi4py"})
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        names.append(f"torch.distributed[{dist.get_backend()}]")
    return names


#: rows (kinds, e.g. ``horovod``) whose rank 1 exits at once, as a crashed rank would: how the
#: tests make one row fail for real and check that the launcher keeps the others
CRASH_VARIABLE = "HVDCOMP_BENCH_CRASH_KINDS"


def run(spec: Dict[str, object]) -> Dict[str, object]:
    rank, size = rank_and_size()
    kind = spec["kind"]
    if rank == 1 and kind in os.environ.get(CRASH_VARIABLE, "").split(","):
        print(f"rank 1 crashes on purpose ({CRASH_VARIABLE}={kind})", flush=True)
        os._exit(3)
    if kind == "compute-only":
        record = run_compute_only(spec, rank, size)
    elif kind in ("ddp", "hvdcomp-ddp"):
        from .ddp_peer import run_ddp
        record = run_ddp(spec, rank, size)
    else:
        from .train_horovod import run_horovod
        record = run_horovod(spec)
    rss, device = peak_memory(str(spec.get("device", "cpu")))
    record.update(rank=rank, world_size=size, hostname=socket.gethostname(),
                  threads=torch.get_num_threads(), peak_rss_bytes=rss, peak_device_bytes=device,
                  comm_modules=record.get("comm_modules", comm_modules()),
                  horovod_env={k: os.environ.get(k) for k in SETTINGS})
    return record


def main(argv: List[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    record = run(spec)
    out = Path(spec["out_dir"]) / f"{spec['tag']}.rank{record['rank']}.json"
    partial = out.with_suffix(".part")
    partial.write_text(json.dumps(record))
    partial.replace(out)
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    # The row is measured and its record written: end without the interpreter's shutdown, where
    # torch's and Horovod's C++ threads can race the teardown of their objects and abort a rank
    # that did all its work (CI saw "terminate called without an active exception" once, after
    # a DDP row). An error above still raises and exits non-zero as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
