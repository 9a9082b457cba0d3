"""Training throughput: steps/s and samples/s of one model per method, each step split into
compute, compression and communication, beside a compute-only baseline, with each rank's peak
memory.

``hvdcomp bench train`` is a launcher (:mod:`hvdcomp.bench.train_launch`): every row below runs in
its own set of N rank processes (``mpirun -np N``, locally or across the ``--link`` emulated link),
one after the other, on the same model, batch, seed and threads:

* ``compute-only`` — forward, backward, ``optimizer.step()`` in plain Python processes that import
  no communication library at all (no Horovod, no MPI, no process group; the record lists the
  communication modules the process had loaded, and it is empty). All N run at the same time, so
  they see the CPU contention the distributed rows see. **Every ratio is over this row.**
* ``horovod-idle`` — the same step inside initialised Horovod ranks, no collective: what
  Horovod's background thread costs by itself (its cycle, ``HOROVOD_CYCLE_TIME``);
* ``horovod`` — P-SGD with Horovod's own ``hvd.DistributedOptimizer``; ``horovod-fp16`` adds
  ``hvd.Compression.fp16``;
* every algorithm × compressor through :func:`hvdcomp.DistributedOptimizer`;
* with ``--peer ddp``: PyTorch DDP (Gloo) with its default allreduce, ``fp16_compress_hook``
  and ``powerSGD_hook``; with ``--peer hvdcomp-ddp``: every hvdcomp row again as a DDP
  communication hook (:mod:`hvdcomp.ddp`); both in :mod:`hvdcomp.bench.ddp_peer`.

One Horovod/hvdcomp step is timed in three parts:

    t0  zero_grad, forward, backward   (hooks launch the uplinks: compression happens here)
    t1  optimizer.synchronize()        (waits for the collectives; hvdcomp: server step, decode)
    t2  optimizer.step() under skip_synchronize()
    t3

``compress`` = the time hvdcomp's hooks spent in ``Exchange.start`` (``optimizer.stats``), 0 for
Horovod; ``comm`` = t2 − t1, the communication backward did not hide (for hvdcomp it includes the
server's decode and re-compression and the workers' decode); ``compute`` = the rest. DDP's
allreduces run inside ``backward()``, so its rows have the step time only (no split). A step's
timings are those of the slowest rank in that step; the table shows means over the timed steps.
Bytes per step: the optimizer's counters (hvdcomp), the ring-allreduce model of each allreduce
the DDP hook launched, or of the whole gradient (Horovod, DDP's default allreduce); mean over ranks.

LIEC-SGD's exact rounds (every ``period`` steps) would rarely fall inside a short timed window, so
one exact step is timed separately and the rate reported is amortised:
((p − 1)·t_compressed + t_exact) / p, its extra time counted as ``comm``.

Peak memory: each rank's peak resident set (``ru_maxrss`` of the rank process, which ran this row
only, so rows do not inherit each other's peaks). ``peak_device_bytes`` is for
``torch.cuda.max_memory_allocated``; ``bench train`` runs on the CPU today, so it is null.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..horovod_settings import describe

DEFAULT_ALGORITHMS = ("liec", "doublesqueeze")
DEFAULT_COMPRESSORS = ("sign",)
BASELINES = ("horovod", "horovod-fp16")
PEERS = ("ddp", "hvdcomp-ddp")
DDP_HOOKS = ("allreduce", "fp16", "powersgd")
#: kinds that run inside initialised Horovod ranks
HOROVOD_KINDS = ("horovod-idle",) + BASELINES + ("hvdcomp",)


@dataclass(frozen=True)
class TrainMethod:
    kind: str   # compute-only | horovod-idle | horovod | horovod-fp16 | hvdcomp | ddp | hvdcomp-ddp
    algorithm: Optional[str] = None
    up: Optional[str] = None
    hook: Optional[str] = None           # ddp: allreduce | fp16 | powersgd
    powersgd_rank: Optional[int] = None

    @property
    def label(self) -> str:
        if self.kind == "hvdcomp":
            return f"{self.algorithm}[{self.up}]"
        if self.kind == "hvdcomp-ddp":
            return f"ddp+{self.algorithm}[{self.up}]"
        if self.kind == "ddp":
            if self.hook == "allreduce":
                return "ddp"
            if self.hook == "powersgd":
                return f"ddp-powersgd[rank={self.powersgd_rank}]"
            return f"ddp-{self.hook}"
        return self.kind


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
    compute_s: Optional[float]     # None where the step cannot be split (DDP)
    compress_s: Optional[float]
    comm_s: Optional[float]
    steps_per_s: float
    samples_per_s: float           # all ranks
    bytes_up: float                # per rank per compressed step, mean over ranks
    bytes_down: float
    bytes_source: str              # "none" | "optimizer counters" | "ring model" | "hook calls"
    peak_rss_bytes: List[int]      # per rank, the rank process's peak resident set
    peak_device_bytes: Optional[List[int]] = None   # CUDA: max_memory_allocated per rank
    bucket_bytes: Optional[int] = None     # hvdcomp: the largest compressed bucket
    threads: Optional[int] = None          # torch intra-op threads of the ranks
    hook: Optional[str] = None
    step_over_compute_only: Optional[float] = None  # step_s / compute-only step_s
    exact_step_s: Optional[float] = None   # LIEC-SGD's exact round, timed separately
    period: Optional[int] = None
    comm_modules: List[str] = field(default_factory=list)   # loaded in rank 0's process
    horovod_env: Optional[Dict[str, Optional[str]]] = None   # as rank 0 saw it

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def plan_train_methods(algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
                       compressors: Sequence[str] = DEFAULT_COMPRESSORS,
                       baselines: Sequence[str] = ("horovod",), peers: Sequence[str] = (),
                       powersgd_rank: int = 1, pattern: Optional[str] = None
                       ) -> List[TrainMethod]:
    """``compute-only`` and ``horovod-idle`` first, then the baselines, every algorithm ×
    compressor, and the peers' rows; ValueError naming the problem for an unknown name or spec,
    or for a ``pattern`` a row's method cannot run (before any rank starts)."""
    from ..algorithms import ALGORITHMS, make_algorithm

    if isinstance(powersgd_rank, bool) or not isinstance(powersgd_rank, int) or powersgd_rank < 1:
        raise ValueError(f"--powersgd-rank must be an integer ≥ 1, not {powersgd_rank!r}")
    methods = [TrainMethod("compute-only"), TrainMethod("horovod-idle")]
    for baseline in baselines:
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}")
        methods.append(TrainMethod(baseline))
    for algorithm in algorithms:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose from "
                             f"{', '.join(sorted(ALGORITHMS))}")
        # a method that takes no compressor (PowerSGD's own factors, MoNNA) runs once
        refuses = ALGORITHMS[algorithm].info.compressors_refused
        for spec in ["none"] if refuses else compressors:
            built = make_algorithm(algorithm, up=spec)
            _check_pattern(built, pattern)
            methods.append(TrainMethod("hvdcomp", algorithm, built.up.spec()))
    return methods + _peer_methods(peers, methods, powersgd_rank)


def _check_pattern(algorithm, pattern: Optional[str]) -> None:
    """What :class:`hvdcomp.exchange.Exchange` would refuse in the ranks, refused here."""
    import torch

    from ..exchange_codec import summable_dtype
    owned = getattr(algorithm, "round_kind", None) == "owned"
    if owned and pattern not in (None, "allreduce"):
        raise ValueError(f"{algorithm.name} all-reduces its own messages: --pattern allreduce "
                         f"(or leave --pattern out), not {pattern}")
    if pattern == "allreduce" and not owned:
        summable_dtype(algorithm.up, torch.float32)   # ValueError for a non-linear compressor


def _peer_methods(peers: Sequence[str], methods: List[TrainMethod],
                  powersgd_rank: int) -> List[TrainMethod]:
    for peer in peers:
        if peer not in PEERS:
            raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)} (or 'none')")
    rows = []
    if "ddp" in peers:
        rows += [TrainMethod("ddp", hook=hook,
                             powersgd_rank=powersgd_rank if hook == "powersgd" else None)
                 for hook in DDP_HOOKS]
    if "hvdcomp-ddp" in peers:   # hvdcomp's algorithms as a DDP hook (hvdcomp.ddp)
        rows += [TrainMethod("hvdcomp-ddp", m.algorithm, m.up) for m in methods
                 if m.kind == "hvdcomp"]
    return rows


# --- combining the ranks' records ---------------------------------------------------------------
def _slowest_per_step(per_rank: List[List[List[Optional[float]]]]) -> List[List[Optional[float]]]:
    """Per step index, the row of the rank whose step took longest."""
    steps = min(len(rows) for rows in per_rank)
    return [max((rows[s] for rows in per_rank), key=lambda row: row[0]) for s in range(steps)]


def _mean(values) -> Optional[float]:
    values = list(values)
    return None if any(v is None for v in values) else statistics.fmean(values)


def combine(method: TrainMethod, records: List[Dict[str, object]], model: str,
            batch_size: int) -> TrainResult:
    """One row from every rank's record (:mod:`hvdcomp.bench.train_worker`): per step the slowest
    rank's timings, bytes averaged over ranks and steps, every rank's peak memory."""
    records = sorted(records, key=lambda r: r["rank"])
    compressed = _slowest_per_step([r["compressed"] for r in records])
    exact_rows = [r["exact"] for r in records]
    exact = _slowest_per_step(exact_rows) if all(exact_rows) else []
    step_s = statistics.fmean(row[0] for row in compressed)
    compute_s, compress_s, comm_s = (_mean(row[i] for row in compressed) for i in (1, 2, 3))
    first = records[0]
    period = first.get("period")
    exact_mean = statistics.fmean(row[0] for row in exact) if exact else None
    if exact_mean is not None and period:
        # amortised over one period: p − 1 compressed rounds and one exact round; the extra
        # time of the exact round is communication (dense allreduces)
        amortised = ((period - 1) * step_s + exact_mean) / period
        if comm_s is not None:
            comm_s += amortised - step_s
        step_s = amortised
    every_up = [row[4] for r in records for row in r["compressed"]]
    every_down = [row[5] for r in records for row in r["compressed"]]
    world = int(first["world_size"])
    devices = [r.get("peak_device_bytes") for r in records]
    return TrainResult(
        method=method.label, kind=method.kind, algorithm=method.algorithm, up=method.up,
        model=model, parameters=int(first["parameters"]), batch_size=batch_size,
        world_size=world, steps=len(compressed), step_s=step_s,
        step_median_s=statistics.median(row[0] for row in compressed), compute_s=compute_s,
        compress_s=compress_s, comm_s=comm_s, steps_per_s=1 / step_s,
        samples_per_s=world * batch_size / step_s, bytes_up=statistics.fmean(every_up),
        bytes_down=statistics.fmean(every_down), bytes_source=str(first["bytes_source"]),
        peak_rss_bytes=[int(r["peak_rss_bytes"]) for r in records],
        peak_device_bytes=None if any(d is None for d in devices) else [int(d) for d in devices],
        bucket_bytes=first.get("bucket_bytes"), threads=first.get("threads"), hook=method.hook,
        exact_step_s=exact_mean, period=period, comm_modules=list(first.get("comm_modules", [])),
        horovod_env=first.get("horovod_env"))


def add_ratios(results: List[TrainResult]) -> None:
    """``step_over_compute_only`` of every row, when the compute-only row ran."""
    base = next((r for r in results if r.kind == "compute-only"), None)
    for row in results:
        row.step_over_compute_only = None if base is None else row.step_s / base.step_s


# --- printing -----------------------------------------------------------------------------------
COLUMNS = ("method", "step ms", "compute ms", "compress ms", "comm ms", "steps/s", "samples/s",
           "step ÷ compute-only", "up B/step", "down B/step", "peak MiB/rank",
           "peak − horovod")
MIB = 1 << 20


def _ms(value: Optional[float]) -> str:
    return "–" if value is None else f"{1e3 * value:.0f}"


def _peak_over_horovod(row: Dict[str, object], horovod: Optional[Dict[str, object]]) -> str:
    """(peak − Horovod's peak) in MiB, and in buckets for hvdcomp rows: the target's reading."""
    if horovod is None or row is horovod or row["kind"] == "compute-only":
        return ""
    extra = max(row["peak_rss_bytes"]) - max(horovod["peak_rss_bytes"])
    text = f"{extra / MIB:+.0f} MiB"
    if row.get("bucket_bytes"):
        text += f" ({extra / row['bucket_bytes']:+.2f}× bucket)"
    return text


def row_cells(doc: Dict[str, object]) -> List[List[str]]:
    """The table's cells, one list per row (the markdown and the rich table share them)."""
    horovod = next((r for r in doc["results"] if r["kind"] == "horovod"), None)
    rows = []
    for r in doc["results"]:
        exact = "" if r.get("exact_step_s") is None else \
            f" (exact round {1e3 * r['exact_step_s']:.0f} ms every {r['period']})"
        ratio = r.get("step_over_compute_only")
        peaks = "/".join(f"{b / MIB:.0f}" for b in r["peak_rss_bytes"])
        rows.append([
            f"{r['method']}{exact}", _ms(r["step_s"]), _ms(r["compute_s"]),
            _ms(r["compress_s"]), _ms(r["comm_s"]), f"{r['steps_per_s']:.2f}",
            f"{r['samples_per_s']:.1f}", "" if ratio is None else f"{ratio:.2f}",
            f"{r['bytes_up']:,.0f}", f"{r['bytes_down']:,.0f}", peaks,
            _peak_over_horovod(r, horovod)])
    return rows


def header_lines(doc: Dict[str, object]) -> List[str]:
    """What the run was: link, ranks, threads, Horovod settings in force."""
    settings = describe(doc.get("horovod_settings", {}))
    return [f"link: {doc.get('link') or 'none (local mpirun)'}; {doc['world_size']} ranks, "
            f"{doc.get('threads')} intra-op threads each; warm-up {doc['warmup']}, "
            f"{doc['steps']} timed steps per row",
            f"Horovod settings: {settings or 'not recorded'}"]


def markdown(doc: Dict[str, object]) -> str:
    """A ``bench train`` JSON document as a markdown table (docs/benchmarks.md)."""
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in row_cells(doc)]
    return "\n".join(header_lines(doc) + [""] + lines)


if __name__ == "__main__":   # python -m hvdcomp.bench.<this> RUN.json ...: markdown tables
    import json
    import sys

    for _path in sys.argv[1:]:
        print(markdown(json.loads(Path(_path).read_text())) + "\n")
