"""Throughput of every compressor against a plain memory copy of the same buffer.

For each compressor spec and buffer size (fp32), :func:`bench_compressors` times ``compress`` and
the decode (warm-up calls, then the median of ``repeats`` timed calls) and, in the same run on
the same buffer and interleaved with them (:func:`interleaved_medians`), ``dst.copy_(src)``.
The decode is ``decompress_into`` an existing buffer, as the exchange decodes into buffers it
reuses and as the copy writes into an existing ``dst`` (a fresh output's page faults would cost
several copies on CPU and measure the allocator, not the compressor).  The machine record says
which road the CPU compressors took (``native``: :func:`hvdcomp.compressors._native.status`).
Throughputs are GB/s (10⁹ bytes) *of fp32 input*: a 64 MiB buffer compressed in 0.1 s is
0.67 GB/s whatever the payload size, so compressors compare with each other and with the copy
directly.  ``roundtrip_gbps`` is size / (t_compress + t_decompress).
"""
from __future__ import annotations

import math
import contextlib
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Sequence

import torch

from ..compressors import base as compressor_base
from ..compressors import from_spec

MIB = 1 << 20
DEFAULT_SIZES_MB = (1, 4, 16, 64, 256)
#: Memory one measurement takes, in buffers of the input's size (the input, the copy target,
#: payloads, decoded tensors and the compressors' intermediates, QSGD's int64 codes the largest):
#: measured, the peak RSS of the default compressors grew by 10.8 buffers from 16 to 128 MiB.
#: What --sizes is checked against.
BUFFERS_PER_MEASUREMENT = 12
DEFAULT_COMPRESSORS = ("none", "fp16", "bf16", "topk:ratio=0.01", "randomk:ratio=0.01", "sign",
                       "blocksign:block=1024", "dgc:ratio=0.01", "qsgd:levels=4",
                       "powersgd:rank=4")


@dataclass
class CompressorResult:
    compressor: str          # the spec, as from_spec reads it back
    size_mib: float          # fp32 input size
    numel: int
    compress_gbps: float
    decompress_gbps: float
    roundtrip_gbps: float    # size / (t_compress + t_decompress)
    memcpy_gbps: float       # dst.copy_(src) of the same buffer, same run
    roundtrip_vs_memcpy: float  # median over repeats of t_memcpy / (t_compress + t_decompress)
    bits_per_element: float  # measured: 8 · payload bytes / numel
    formula_bits_per_element: float  # 8 · payload_nbytes(numel) / numel (the docstring formula)
    compress_s: float        # median seconds
    decompress_s: float

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def parse_spec_list(text: str) -> List[str]:
    """Split ``"topk:ratio=0.01,fp16_values=true,sign"`` into specs: a comma starts a new spec
    unless the next item is ``key=value`` without a ``name:`` (then it continues the spec)."""
    specs: List[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if specs and "=" in item and ":" not in item:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def parse_sizes(text: str) -> List[float]:
    """``"1,16,64"`` -> [1.0, 16.0, 64.0] (MiB); raises ValueError naming a bad entry."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"size {item!r} is not a number of MiB") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"size {item!r} must be a positive, finite number of MiB")
        sizes.append(value)
    if not sizes:
        raise ValueError("give at least one size in MiB, e.g. 1,16,64")
    return sizes


def machine_info(device: torch.device) -> Dict[str, object]:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os
    info: Dict[str, object] = {"cpu": model, "torch_threads": torch.get_num_threads(),
                               "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
                               "torch": torch.__version__, "python": platform.python_version(),
                               "device": str(device)}
    if device.type == "cpu":
        from ..compressors import _native
        info["native"] = _native.status()
    try:
        info["cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def interleaved_times(fns: Sequence[Callable[[], object]], device: torch.device, warmup: int,
                      repeats: int) -> List[List[float]]:
    """Wall times of each function, timed round-robin: every repeat times each function once,
    so a copy and the compressor it is compared with see the same machine load (the shared
    2-core machine this was written on is rarely idle).  CUDA work is synchronised.
    Returns ``times[f][r]``: seconds of function f in repeat r."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - start)
    return times


def interleaved_medians(fns: Sequence[Callable[[], object]], device: torch.device, warmup: int,
                        repeats: int) -> List[float]:
    """Median of :func:`interleaved_times` per function."""
    return [statistics.median(samples)
            for samples in interleaved_times(fns, device, warmup, repeats)]


def bench_compressors(specs: Sequence[str] = DEFAULT_COMPRESSORS,
                      sizes_mib: Sequence[float] = DEFAULT_SIZES_MB, device: str = "cpu",
                      warmup: int = 1, repeats: int = 5, seed: int = 0,
                      finite_check: str = "auto", threads: "int | None" = None,
                      progress: Callable[[str], None] = lambda message: None
                      ) -> List[CompressorResult]:
    """Time every (spec, size) pair; returns one record each, sizes outermost."""
    if warmup < 0 or repeats < 1:
        raise ValueError("warmup must be >= 0 and repeats >= 1")
    compressors = [from_spec(spec) for spec in specs]          # bad specs fail before timing
    dev = torch.device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    old_mode = compressor_base.set_finite_check(finite_check)
    results = []
    try:
        for size in sizes_mib:
            with _allocation_errors(size, device):
                results += _bench_size(compressors, size, dev, warmup, repeats, seed, progress)
    finally:
        compressor_base.set_finite_check(old_mode)
        torch.set_num_threads(old_threads)
    return results


@contextlib.contextmanager
def _allocation_errors(size_mib: float, device: str):
    """An allocation that fails (a size the up-front check let through, memory taken meanwhile)
    becomes one clear BenchError instead of torch's allocator traceback."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        out_of_memory = isinstance(exc, MemoryError) or "alloc" in str(exc).lower() \
            or type(exc).__name__ == "OutOfMemoryError"
        if not out_of_memory:
            raise
        from .output import BenchError
        raise BenchError(f"--sizes: {size_mib:g} MiB does not fit in the memory of {device} "
                         f"({str(exc).splitlines()[0][:200]}); give smaller sizes") from None


def _bench_size(compressors, size, dev, warmup, repeats, seed, progress) -> List[CompressorResult]:
    """Every compressor on one buffer of ``size`` MiB."""
    results = []
    numel = max(1, int(size * MIB) // 4)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen).to(dev)
    copy_target = torch.empty_like(x)
    decoded = torch.zeros_like(x)          # written once, so its pages are mapped before timing
    nbytes_in = numel * 4
    for compressor in compressors:
        progress(f"{compressor.spec()} @ {size:g} MiB")
        payload = compressor.compress(x, seed)
        times = interleaved_times(
            [lambda: copy_target.copy_(x),
             lambda: compressor.compress(x, seed),
             lambda: compressor.decompress_into(payload, decoded, seed)],
            dev, warmup, repeats)
        memcpy_s, compress_s, decompress_s = (statistics.median(t) for t in times)
        roundtrip = nbytes_in / (compress_s + decompress_s) / 1e9
        memcpy = nbytes_in / memcpy_s / 1e9
        # ratio per repeat (copy and compressor timed back to back), then the median:
        # steadier than a ratio of medians when the machine's load changes
        paired = statistics.median(copy / (comp + decomp)
                                   for copy, comp, decomp in zip(*times))
        results.append(CompressorResult(
            compressor=compressor.spec(), size_mib=size, numel=numel,
            compress_gbps=nbytes_in / compress_s / 1e9,
            decompress_gbps=nbytes_in / decompress_s / 1e9,
            roundtrip_gbps=roundtrip, memcpy_gbps=memcpy,
            roundtrip_vs_memcpy=paired,
            bits_per_element=8 * payload.numel() / numel,
            formula_bits_per_element=8 * compressor.payload_nbytes(numel) / numel,
            compress_s=compress_s, decompress_s=decompress_s))
    return results
