"""Training throughput on real ranks: steps/s and samples/s of one model per method, with each
step split into compute, compression and communication, beside the compute-only ideal.

Runs inside Horovod ranks (``mpirun -np 2 hvdcomp bench train``; ``hvd.init()`` done by the
caller). Synthetic data (one fixed random batch per rank: the data pipeline is not what is
measured), plain SGD with momentum. Methods, all in the same run on the same model:

* ``ideal``        — forward, backward, ``optimizer.step()``: no exchange at all. Every rank
  computes at the same time, so it sees the same CPU contention as the distributed rows;
* ``horovod``      — P-SGD with Horovod's own ``hvd.DistributedOptimizer`` (allreduce launched
  from the gradient hooks, fused by Horovod); ``horovod-fp16`` adds ``hvd.Compression.fp16``;
* every algorithm × compressor through :func:`hvdcomp.DistributedOptimizer` (default pattern).

One step is timed in three parts:

    t0  zero_grad, forward, backward   (hooks launch the uplinks: compression happens here)
    t1  optimizer.synchronize()        (waits for the collectives; hvdcomp: server step, decode)
    t2  optimizer.step() under skip_synchronize()
    t3

``compress`` = the time hvdcomp's hooks spent in ``Exchange.start`` (worker compression and the
launch of the uplink; ``optimizer.stats.time_compress``), 0 for Horovod; ``comm`` = t2 − t1, the
communication that backward did not hide (for hvdcomp it includes the server's decode and
re-compression and the workers' decode, which run inside ``finish``); ``compute`` = the rest.
A step's timings are those of the slowest rank in that step; the table shows means over the
timed steps, so the parts add up to the step time. Bytes per step are the optimizer's counters
(``optimizer.stats``; Horovod's rows: the ring-allreduce model of :mod:`hvdcomp.bench.comm`),
averaged over ranks.

LIEC-SGD's exact rounds (every ``period`` steps a dense allreduce of the gradient plus one of the
parameters) would rarely fall inside a short timed window, so one exact step is timed separately
(the algorithm's round counter is advanced to the next exact round, which changes nothing but the
round number) and the rate reported is amortised: ((p − 1)·t_compressed + t_exact) / p.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..algorithms import ALGORITHMS, make_algorithm
from .comm import ring_model_bytes

DEFAULT_ALGORITHMS = ("liec", "doublesqueeze")
DEFAULT_COMPRESSORS = ("sign",)
BASELINES = ("horovod", "horovod-fp16")


@dataclass(frozen=True)
class TrainMethod:
    kind: str                      # "ideal" | "horovod" | "horovod-fp16" | "hvdcomp"
    algorithm: Optional[str] = None
    up: Optional[str] = None

    @property
    def label(self) -> str:
        return f"{self.algorithm}[{self.up}]" if self.kind == "hvdcomp" else self.kind


@dataclass
class TrainResult:
    method: str
    kind: str
    algorithm: Optional[str]
    up: Optional[str]
    model: str
    parameters: int
    batch_size: int                # per rank
    world_size: int
    steps: int                     # timed (compressed) steps
    step_s: float                  # mean over timed steps (amortised for periodic algorithms)
    step_median_s: float
    compute_s: float
    compress_s: float
    comm_s: float
    steps_per_s: float
    samples_per_s: float           # all ranks
    vs_ideal: Optional[float]      # ideal step_s / this step_s (1.0 = no exchange cost)
    bytes_up: float                # per rank per compressed step, mean over ranks
    bytes_down: float
    exact_step_s: Optional[float] = None   # LIEC-SGD's exact round, timed separately
    period: Optional[int] = None

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def plan_train_methods(algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
                       compressors: Sequence[str] = DEFAULT_COMPRESSORS,
                       baselines: Sequence[str] = ("horovod",)) -> List[TrainMethod]:
    """``ideal`` first, then the baselines, then every algorithm × compressor; ValueError naming
    the problem for an unknown name or spec."""
    methods = [TrainMethod("ideal")]
    for baseline in baselines:
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}")
        methods.append(TrainMethod(baseline))
    for algorithm in algorithms:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose from "
                             f"{', '.join(sorted(ALGORITHMS))}")
        for spec in compressors:
            built = make_algorithm(algorithm, up=spec)
            methods.append(TrainMethod("hvdcomp", algorithm, built.up.spec()))
    return methods


class _Runner:
    """One method's model, optimizer and fixed batch; :meth:`step` returns its four timings."""

    def __init__(self, method: TrainMethod, model_name: str, batch_size: int, image_size: int,
                 num_classes: int, hvd, seed: int, pattern: Optional[str]):
        from ..train.models import build_model, needs_images

        self.method, self.hvd = method, hvd
        torch.manual_seed(seed)   # same initial model on every rank and for every method
        shape = (3, image_size, image_size) if needs_images(model_name) else (3 * image_size ** 2,)
        self.model = build_model(model_name, shape, num_classes)
        generator = torch.Generator().manual_seed(seed + 1000 * (hvd.rank() + 1))
        self.inputs = torch.randn(batch_size, *shape, generator=generator)
        self.labels = torch.randint(num_classes, (batch_size,), generator=generator)
        base = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        named = list(self.model.named_parameters())
        if method.kind == "ideal":
            self.optimizer = base
        elif method.kind in BASELINES:
            compression = hvd.Compression.fp16 if method.kind == "horovod-fp16" \
                else hvd.Compression.none
            self.optimizer = hvd.DistributedOptimizer(base, named_parameters=named,
                                                      compression=compression)
        else:
            import hvdcomp
            self.optimizer = hvdcomp.DistributedOptimizer(
                base, named_parameters=named, pattern=pattern,
                compression=hvdcomp.Compression.algorithm(method.algorithm, up=method.up))
        self.gradient_numel = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def stats(self):
        return getattr(self.optimizer, "stats", None)

    @property
    def period(self) -> Optional[int]:
        algorithm = getattr(self.optimizer, "algorithm", None)
        return getattr(algorithm, "period", None)

    def next_is_exact(self) -> bool:
        exchange = getattr(self.optimizer, "exchange", None)
        return bool(exchange is not None and exchange.is_sync_step())

    def jump_to_exact_round(self) -> None:
        """Advance the algorithm's round counter so that the next round is an exact one (LIEC's
        exact rounds depend on nothing but the counter)."""
        algorithm, period = self.optimizer.algorithm, self.period
        algorithm.step += (period - 1 - algorithm.step % period) % period

    def step(self) -> Tuple[float, float, float, float, int, int]:
        """(step, compute, compress, comm) seconds and this step's (bytes_up, bytes_down)."""
        stats = self.stats
        before = (stats.time_compress, stats.bytes_up, stats.bytes_down) if stats else (0.0, 0, 0)
        exact = self.next_is_exact()
        t0 = time.perf_counter()
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(self.inputs), self.labels)
        loss.backward()
        t1 = time.perf_counter()
        if self.method.kind != "ideal":
            self.optimizer.synchronize()
        t2 = time.perf_counter()
        if self.method.kind == "ideal":
            self.optimizer.step()
        else:
            with self.optimizer.skip_synchronize():
                self.optimizer.step()
        t3 = time.perf_counter()
        compress = stats.time_compress - before[0] if stats else 0.0
        comm = t2 - t1 if self.method.kind != "ideal" else 0.0
        update = t3 - t1 - comm
        if exact:   # LIEC's exact round averages the parameters inside step(): communication
            comm, update = comm + update, 0.0
        compute = (t1 - t0 - compress) + update
        if stats:
            up, down = stats.bytes_up - before[1], stats.bytes_down - before[2]
        elif self.method.kind in BASELINES:
            itemsize = 2 if self.method.kind == "horovod-fp16" else 4
            up, down = ring_model_bytes(self.gradient_numel, itemsize, self.hvd.size(),
                                        self.hvd.rank())
        else:
            up = down = 0
        return t3 - t0, compute, compress, comm, up, down


def _gather_steps(hvd, rows: List[Tuple[float, ...]], name: str
                  ) -> Tuple[List[Tuple[float, ...]], float, float]:
    """Per step, the timings of the rank whose step took longest (every rank gets the same), and
    the bytes up and down per step averaged over ranks and steps (ranks own chunks of different
    sizes, so their counts differ slightly)."""
    mine = torch.tensor([rows], dtype=torch.float64)           # (1, steps, fields)
    everyone = hvd.allgather(mine, name=name)                   # (ranks, steps, fields)
    slowest = everyone[:, :, 0].argmax(dim=0)                   # rank per step
    timings = [tuple(everyone[r, s, :4].tolist()) for s, r in enumerate(slowest.tolist())]
    return timings, everyone[:, :, 4].mean().item(), everyone[:, :, 5].mean().item()


def measure(method: TrainMethod, hvd, model_name: str = "resnet18", batch_size: int = 8,
            image_size: int = 32, num_classes: int = 10, warmup: int = 2, steps: int = 10,
            seed: int = 0, pattern: Optional[str] = None, tag: str = "m") -> TrainResult:
    runner = _Runner(method, model_name, batch_size, image_size, num_classes, hvd, seed, pattern)
    for _ in range(warmup):
        runner.step()
    compressed, exact = [], []
    for _ in range(steps):
        is_exact = runner.next_is_exact()
        (exact if is_exact else compressed).append(runner.step())
    period = runner.period
    if period is not None and period > 1 and not exact:
        runner.jump_to_exact_round()
        runner.step()                     # warm-up: the first exact round pays one-time costs
        runner.jump_to_exact_round()
        exact.append(runner.step())
    if not compressed:   # period 1: every round exact
        compressed, exact = exact, []
    compressed, up, down = _gather_steps(hvd, compressed, f"bench.train.{tag}.c")
    exact_mean = None
    if exact:
        exact_rows, _, _ = _gather_steps(hvd, exact, f"bench.train.{tag}.e")
        exact_mean = statistics.fmean(r[0] for r in exact_rows)
    step_s, compute_s, compress_s, comm_s = [statistics.fmean(r[i] for r in compressed)
                                             for i in range(4)]
    if exact_mean is not None and period:
        # amortised over one period: p − 1 compressed rounds and one exact round; the extra
        # time of the exact round is communication (dense allreduces)
        amortised = ((period - 1) * step_s + exact_mean) / period
        comm_s += amortised - step_s
        step_s = amortised
    return TrainResult(
        method=method.label, kind=method.kind, algorithm=method.algorithm, up=method.up,
        model=model_name, parameters=runner.gradient_numel, batch_size=batch_size,
        world_size=hvd.size(), steps=len(compressed), step_s=step_s,
        step_median_s=statistics.median(r[0] for r in compressed), compute_s=compute_s,
        compress_s=compress_s, comm_s=comm_s, steps_per_s=1 / step_s,
        samples_per_s=hvd.size() * batch_size / step_s, vs_ideal=None, bytes_up=up,
        bytes_down=down, exact_step_s=exact_mean, period=period)


def bench_train(hvd, methods: Optional[Sequence[TrainMethod]] = None, model_name: str = "resnet18",
                batch_size: int = 8, image_size: int = 32, num_classes: int = 10,
                warmup: int = 2, steps: int = 10, seed: int = 0, pattern: Optional[str] = None,
                progress: Callable[[str], None] = lambda message: None) -> List[TrainResult]:
    """Every method in turn (the same list on every rank); ``vs_ideal`` filled when ``ideal`` ran."""
    if warmup < 0 or steps < 1:
        raise ValueError("warmup must be ≥ 0 and steps ≥ 1")
    methods = list(methods) if methods is not None else plan_train_methods()
    results = []
    for i, method in enumerate(methods):
        progress(method.label)
        results.append(measure(method, hvd, model_name, batch_size, image_size, num_classes,
                               warmup, steps, seed, pattern, tag=f"m{i}"))
    ideal = next((r for r in results if r.kind == "ideal"), None)
    if ideal is not None:
        for row in results:
            row.vs_ideal = ideal.step_s / row.step_s
    return results


def run_info(hvd) -> Dict[str, object]:
    from .comm import run_info as comm_info
    return comm_info(hvd)


def markdown(doc: Dict[str, object]) -> str:
    """A ``bench train`` JSON document as a markdown table (docs/benchmarks.md)."""
    lines = ["| method | step ms | compute ms | compress ms | comm ms | steps/s | samples/s | "
             "vs ideal | up B/step | down B/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        exact = "" if r.get("exact_step_s") is None else \
            f" (exact round {1e3 * r['exact_step_s']:.0f} ms every {r['period']})"
        vs_ideal = "" if r["vs_ideal"] is None else f"{100 * r['vs_ideal']:.0f} %"
        lines.append(
            f"| {r['method']}{exact} | {1e3 * r['step_s']:.0f} | {1e3 * r['compute_s']:.0f} | "
            f"{1e3 * r['compress_s']:.0f} | {1e3 * r['comm_s']:.0f} | {r['steps_per_s']:.2f} | "
            f"{r['samples_per_s']:.1f} | {vs_ideal} | {r['bytes_up']:,.0f} | "
            f"{r['bytes_down']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":   # python -m hvdcomp.bench.<this> RUN.json ...: markdown tables
    import json
    import sys

    for _path in sys.argv[1:]:
        print(markdown(json.loads(Path(_path).read_text())) + "\n")
