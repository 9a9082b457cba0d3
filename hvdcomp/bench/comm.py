"""Time of one compressed exchange on real ranks, next to Horovod's own allreduces.

Runs inside Horovod ranks (``mpirun -np 2 hvdcomp bench comm``; the caller starts the engine and
passes its communicator: every collective here goes through it).
For every buffer size (fp32, MiB) it measures, in the same run and on the same buffer:

* ``horovod``       — the communicator's allreduce average of ``x`` (on Horovod's communicator
  ``hvd.allreduce(x, op=Average)``), uncompressed (what P-SGD sends);
* ``horovod-fp16``  — ``hvd.Compression.fp16`` semantics: cast to fp16, allreduce, cast back;
* every algorithm × compressor × pattern of :class:`hvdcomp.exchange.Exchange`
  (``two_phase`` is the sharded server, ``allgather`` the GRACE/DGC pattern): one round =
  ``start`` + ``finish`` + ``end_round``, i.e. worker compression, uplink, server decode/average/
  compress, downlink, worker decode and update.

Timing: ``warmup`` untimed rounds, then ``repeats`` rounds, each started after a barrier; a
round's time is the slowest rank's. Reported: median, min and max over rounds. LIEC-SGD's exact
rounds (every ``period``-th round a dense allreduce) are run untimed between timed rounds: the
table shows the compressed round, and the amortised cost of the exact round is
``t(horovod)/period``.

Bandwidths follow nccl-tests: ``algbw = S/t`` with S the *uncompressed* fp32 buffer size, and
``busbw = algbw · 2(N−1)/N``, so a compressed row's busbw is the link speed an uncompressed ring
allreduce would need to finish in the same time.

Bytes per rank per round (``bytes_up``, ``bytes_down``): the exchange's counters (mean over
ranks; see :mod:`hvdcomp.exchange`), next to the compressors' formulas computed from
``payload_nbytes`` of the whole buffer (``formula_up``, ``formula_down``):

    two_phase   up (N−1)/N · |C_up(d)|       down (N−1)/N · |C_down(d)|
    allgather   up (N−1)   · |C_up(d)|       down 0
    allreduce   up (N−1)/N · |C_up(d)|       down (N−1)/N · |C_up(d)|    (ring allreduce)
    horovod     up (N−1)/N · 4d              down (N−1)/N · 4d            (fp16: 2d)

Chunking adds per-chunk headers (a sign chunk has its own 4-byte scale, top-k rounds k up per
chunk); ``bytes_ok`` says the counters are within 2 % of the formula. Horovod's rows have no
counter of their own: their counts are the ring-allreduce model the exchange uses for allreduces.
``wire_tx_bytes`` is the interface's own transmit counter per round (``/sys/class/net/<iface>``,
present on the emulated link's ``mpi0``): it includes TCP/IP headers and Horovod's coordination
messages, so it is a few per cent above the payload counts.
"""
from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..algorithms import ALGORITHMS, make_algorithm
from ..compressors import from_spec
from ..exchange import PATTERNS, Exchange
from ..exchange_ledger import ring_allreduce_bytes, ring_allreduce_mean

MIB = 1 << 20
DEFAULT_SIZES_MIB = (1, 4, 16, 64, 256)
DEFAULT_ALGORITHMS = ("liec", "doublesqueeze", "memsgd")
DEFAULT_COMPRESSORS = ("sign", "topk:ratio=0.01")
DEFAULT_PATTERNS = ("two_phase", "allgather")
#: tolerance of the byte check: counted bytes vs the compressors' formula
BYTES_TOLERANCE = 0.02
BASELINES = ("horovod", "horovod-fp16")


@dataclass(frozen=True)
class Method:
    """One row kind: a Horovod baseline (``kind`` = ``"horovod"``/``"horovod-fp16"``) or an
    exchange (``kind`` = ``"exchange"``) of ``algorithm`` with ``up``/``down`` and ``pattern``."""
    kind: str
    algorithm: Optional[str] = None
    up: Optional[str] = None
    down: Optional[str] = None
    pattern: Optional[str] = None

    @property
    def label(self) -> str:
        if self.kind != "exchange":
            return self.kind
        down = "" if self.down in (None, self.up) else f"/{self.down}"
        return f"{self.algorithm}[{self.up}{down}] {self.pattern}"


@dataclass
class CommResult:
    method: str
    kind: str
    algorithm: Optional[str]
    up: Optional[str]
    down: Optional[str]          # the downlink compressor actually used (none for memsgd, ef21)
    pattern: Optional[str]
    size_mib: float
    numel: int
    world_size: int
    time_median_s: float
    time_min_s: float
    time_max_s: float
    algbw_gbps: float            # 10⁹ bytes/s of the fp32 buffer
    busbw_gbps: float
    bytes_up: float              # per rank per round, mean over ranks
    bytes_down: float
    formula_up: float
    formula_down: float
    bytes_ok: bool
    bytes_source: str            # "exchange counters" | "ring model"
    wire_tx_bytes: Optional[float] = None    # interface counter per round, mean over ranks
    speedup_vs_horovod: Optional[float] = None
    times_s: List[float] = field(default_factory=list)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


# --- what to measure ---------------------------------------------------------------------------
def plan_methods(algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
                 compressors: Sequence[str] = DEFAULT_COMPRESSORS,
                 patterns: Sequence[str] = DEFAULT_PATTERNS,
                 baselines: Sequence[str] = BASELINES) -> List[Method]:
    """Baselines first, then every algorithm × compressor × pattern. ValueError naming the
    problem for an unknown algorithm, compressor or pattern, or a combination the exchange
    refuses (the ``allreduce`` pattern needs a linear compressor)."""
    methods = []
    for baseline in baselines:
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}")
        methods.append(Method(baseline))
    for pattern in patterns:
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r}; choose from {', '.join(PATTERNS)}")
    for algorithm in algorithms:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose from "
                             f"{', '.join(sorted(ALGORITHMS))}")
        for spec in compressors:
            built = make_algorithm(algorithm, up=spec)       # ValueError for a bad spec
            for pattern in patterns:
                if pattern == "allreduce" and not built.up.linear:
                    raise ValueError(f"pattern 'allreduce' needs a linear compressor; {spec!r} is "
                                     "not: drop 'allreduce' from --patterns or use fp16/none")
                methods.append(Method("exchange", algorithm, built.up.spec(), built.down.spec(),
                                      pattern))
    return methods


def numel_of(size_mib: float) -> int:
    """fp32 elements in ``size_mib`` MiB (at least 1)."""
    return max(1, int(round(size_mib * MIB / 4)))


# --- byte formulas (independent of the exchange's chunk-by-chunk counting) ---------------------
def formula_bytes(method: Method, numel: int, world_size: int) -> Tuple[float, float]:
    """Bytes per rank per round from the compressors' ``payload_nbytes`` of the whole buffer
    (see the module docstring's table)."""
    n = world_size
    if method.kind in ("horovod", "horovod-fp16"):
        ring = ring_allreduce_mean((4 if method.kind == "horovod" else 2) * numel, n)
        return ring, ring
    up = from_spec(method.up).payload_nbytes(numel, torch.float32)
    down = from_spec(method.down).payload_nbytes(numel, torch.float32)
    if method.pattern == "two_phase":
        return (n - 1) / n * up, (n - 1) / n * down
    if method.pattern == "allgather":
        return (n - 1) * up, 0.0
    ring = ring_allreduce_mean(up, n)        # allreduce pattern: a ring allreduce of the payload
    return ring, ring


def ring_model_bytes(numel: int, itemsize: int, world_size: int, rank: int) -> Tuple[int, int]:
    """The exchange's accounting of an allreduce (reduce-scatter half up, allgather half down;
    :func:`hvdcomp.exchange_ledger.ring_allreduce_bytes`): used for Horovod's own allreduces."""
    return ring_allreduce_bytes(numel, itemsize, world_size, rank)


# --- measuring ---------------------------------------------------------------------------------
def interface_tx_bytes(iface: Optional[str]) -> Optional[int]:
    """The transmit counter of network interface ``iface`` in this namespace, or None."""
    if not iface:
        return None
    try:
        return int(Path(f"/sys/class/net/{iface}/statistics/tx_bytes").read_text())
    except (OSError, ValueError):
        return None


class _Round:
    """One method on one buffer: ``prepare()`` (untimed, e.g. LIEC's exact rounds), ``run()``
    (one timed round), ``bytes()`` (this rank's (up, down) of the last round)."""

    def __init__(self, method: Method, grad: torch.Tensor, comm, key: str):
        self.method, self.grad, self.comm, self.key = method, grad, comm, key
        self.exact_rounds_skipped = 0
        if method.kind == "exchange":
            algorithm = make_algorithm(method.algorithm, up=method.up, down=method.down)
            self.exchange = Exchange(algorithm, comm, pattern=method.pattern)
            self.exchange.prepare({key: (grad.numel(), grad.dtype)})
            # a round runs as hvdcomp.DistributedOptimizer runs it: the gradient in the
            # bucket's buffer, which is also update_into; refilled before each round, untimed
            self.bucket = torch.empty_like(grad)
        else:
            self.exchange = None

    def prepare(self) -> None:
        # exact (uncompressed) rounds of LIEC-SGD are a dense allreduce: not what a row measures
        while self.exchange is not None and self.exchange.is_sync_step():
            self._exchange()
            self.exact_rounds_skipped += 1
        if self.exchange is not None:
            self.bucket.copy_(self.grad)

    def _exchange(self) -> None:
        self.bucket.copy_(self.grad)
        self._exchange_bucket()

    def _exchange_bucket(self) -> None:
        self.exchange.finish(self.exchange.start(self.key, self.bucket, update_into=self.bucket))
        self.exchange.end_round()

    def run(self) -> None:
        comm = self.comm
        if self.method.kind == "horovod":
            comm.allreduce(self.grad, self.key, op="average")
        elif self.method.kind == "horovod-fp16":
            # hvd.Compression.fp16: cast, allreduce in fp16, cast back
            comm.allreduce(self.grad.to(torch.float16), self.key, op="average").to(
                self.grad.dtype)
        else:
            self._exchange_bucket()          # the bucket was refilled by prepare(), untimed

    def bytes(self, rank: int, size: int) -> Tuple[int, int]:
        if self.exchange is not None:
            return self.exchange.last_round_bytes["up"], self.exchange.last_round_bytes["down"]
        itemsize = 2 if self.method.kind == "horovod-fp16" else 4
        return ring_model_bytes(self.grad.numel(), itemsize, size, rank)


def measure(method: Method, size_mib: float, comm, warmup: int, repeats: int,
            key: str, seed: int = 0, iface: Optional[str] = None) -> CommResult:
    """Time ``method`` on an fp32 buffer of ``size_mib`` MiB; every rank must call it with the
    same arguments, in the same order. Returns the same record on every rank."""
    rank, size = comm.rank, comm.size
    numel = numel_of(size_mib)
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(seed + rank))
    one = _Round(method, grad, comm, key)
    for _ in range(warmup):
        one.prepare()
        one.run()
    times, counts = [], set()
    # A collective returns once its data sits in the socket buffers, maybe before it has left
    # the (shaped) interface; a barrier's messages travel behind the data on the same TCP
    # connection, so after one every byte of the rounds before it has been transmitted.
    comm.barrier(f"{key}.barrier.start")
    tx_before = interface_tx_bytes(iface)
    for round_ in range(repeats):
        one.prepare()
        comm.barrier(f"{key}.barrier.{round_}")
        began = time.perf_counter()
        one.run()
        times.append(time.perf_counter() - began)
        counts.add(one.bytes(rank, size))
    comm.barrier(f"{key}.barrier.end")
    tx_after = interface_tx_bytes(iface)
    if len(counts) != 1:
        raise RuntimeError(f"{method.label}: byte counts changed between rounds: {sorted(counts)}")
    up, down = counts.pop()
    wire = (tx_after - tx_before) / repeats if tx_before is not None and tx_after is not None \
        else float("nan")
    # every rank's figures, so that every rank returns the same record
    mine = torch.tensor([[*times, float(up), float(down), wire]], dtype=torch.float64)
    everyone = comm.allgather(mine, f"{key}.figures")
    per_round = everyone[:, :repeats].max(dim=0).values.tolist()     # the slowest rank's time
    mean_up, mean_down = everyone[:, repeats].mean().item(), everyone[:, repeats + 1].mean().item()
    wires = everyone[:, repeats + 2]
    formula_up, formula_down = formula_bytes(method, numel, size)
    median = statistics.median(per_round)
    algbw = 4 * numel / median / 1e9
    down_spec = one.exchange.algorithm.down.spec() if one.exchange is not None else None
    return CommResult(
        method=method.label, kind=method.kind, algorithm=method.algorithm, up=method.up,
        down=down_spec, pattern=method.pattern, size_mib=size_mib, numel=numel,
        world_size=size, time_median_s=median, time_min_s=min(per_round),
        time_max_s=max(per_round), algbw_gbps=algbw,
        busbw_gbps=algbw * 2 * (size - 1) / size,
        bytes_up=mean_up, bytes_down=mean_down, formula_up=formula_up, formula_down=formula_down,
        bytes_ok=_within(mean_up, formula_up) and _within(mean_down, formula_down),
        bytes_source="exchange counters" if method.kind == "exchange" else "ring model",
        wire_tx_bytes=None if torch.isnan(wires).any() else wires.mean().item(),
        times_s=per_round)


def _within(counted: float, formula: float, tolerance: float = BYTES_TOLERANCE) -> bool:
    if formula == 0:
        return counted == 0
    return abs(counted - formula) <= tolerance * formula


def bench_comm(comm, sizes_mib: Sequence[float] = DEFAULT_SIZES_MIB,
               methods: Optional[Sequence[Method]] = None, warmup: int = 1, repeats: int = 5,
               seed: int = 0, iface: Optional[str] = "mpi0",
               progress: Callable[[str], None] = lambda message: None) -> List[CommResult]:
    """Every method at every size (sizes outermost); the same list on every rank.

    ``speedup_vs_horovod`` of each row is t(horovod)/t(row) at the same size when the
    ``horovod`` baseline is among the methods."""
    if warmup < 0 or repeats < 1:
        raise ValueError("warmup must be ≥ 0 and repeats ≥ 1")
    methods = list(methods) if methods is not None else plan_methods()
    results = []
    for s, size_mib in enumerate(sizes_mib):
        rows = []
        for m, method in enumerate(methods):
            progress(f"{method.label} @ {size_mib:g} MiB")
            rows.append(measure(method, size_mib, comm, warmup, repeats,
                                key=f"bench.s{s}.m{m}", seed=seed, iface=iface))
        reference = next((r for r in rows if r.kind == "horovod"), None)
        for row in rows:
            if reference is not None:
                row.speedup_vs_horovod = reference.time_median_s / row.time_median_s
        results.extend(rows)
    return results


def run_info(comm) -> Dict[str, object]:
    """Where and how this was measured: hosts of every rank, link, load average."""
    from .compressors import machine_info

    hosts = comm.allgather_object(socket.gethostname(), "bench.hosts")
    link = os.environ.get("HVDCOMP_BENCH_LINK")
    return {"machine": machine_info(torch.device("cpu")), "world_size": comm.size,
            "hosts": hosts, "link": link or None, "loadavg_start": list(os.getloadavg())}


def markdown(doc: Dict[str, object]) -> str:
    """A ``bench comm`` JSON document as a markdown table (docs/benchmarks.md)."""
    lines = ["| method | MiB | time ms (median) | min–max ms | algbw GB/s | busbw GB/s | "
             "vs horovod | up B | down B | formula up / down B | bytes | wire tx B |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in doc["results"]:
        speedup = r.get("speedup_vs_horovod")
        wire = r.get("wire_tx_bytes")
        lines.append(
            f"| {r['method']} | {r['size_mib']:g} | {1e3 * r['time_median_s']:.1f} | "
            f"{1e3 * r['time_min_s']:.1f}–{1e3 * r['time_max_s']:.1f} | {r['algbw_gbps']:.3f} | "
            f"{r['busbw_gbps']:.3f} | {'' if speedup is None else f'{speedup:.2f}×'} | "
            f"{r['bytes_up']:,.0f} | {r['bytes_down']:,.0f} | "
            f"{r['formula_up']:,.0f} / {r['formula_down']:,.0f} | "
            f"{'ok' if r['bytes_ok'] else '**MISS > 2 %**'} | "
            f"{'' if wire is None else f'{wire:,.0f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":   # python -m hvdcomp.bench.<this> RUN.json ...: markdown tables
    import json
    import sys

    for _path in sys.argv[1:]:
        print(markdown(json.loads(Path(_path).read_text())) + "\n")
