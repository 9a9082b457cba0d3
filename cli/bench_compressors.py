"""``hvdcomp bench compressors``: compress/decompress throughput of every compressor, next to a
plain memory copy of the same buffer.  The measuring lives in :mod:`hvdcomp.bench.compressors`;
this module parses options and prints."""
from __future__ import annotations

import json

import click

from hvdcomp.cli.formats import output_format
from hvdcomp.bench.output import BenchError


@click.command("compressors")
@click.option("--sizes", default="1,4,16,64,256", show_default=True,
              help="Comma-separated fp32 buffer sizes in MiB (each must fit in the memory "
                   "available; checked before measuring).")
@click.option("--compressors", "compressor_list", default=None,
              help="Comma-separated compressor specs, e.g. 'sign,topk:ratio=0.01,fp16_values=true' "
                   "(a key=value after a comma continues the previous spec). Default: one of each.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed calls per measurement (the median is reported).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0),
              help="Untimed calls before timing.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--finite-check", type=click.Choice(["auto", "always", "deferred", "off"]),
              default="auto",
              show_default=True, help="NaN/Inf check mode during the run (see compressors.base).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads during the run (default: torch's own choice).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the test buffer.")
@output_format
def command(sizes, compressor_list, repeats, warmup, device, finite_check, threads, seed,
            fmt):
    """Throughput (GB/s of fp32 input) of compress and decompress (into an existing buffer, as
    the exchange decodes), and bits per element."""
    import torch

    from hvdcomp.bench import compressors as bench

    size_list, specs, dev = _checked_options(sizes, compressor_list, device)
    from rich.console import Console
    err = Console(stderr=True)
    with err.status("measuring...") as status:
        results = bench.bench_compressors(
            specs, size_list, device=device, warmup=warmup, repeats=repeats, seed=seed,
            finite_check=finite_check, threads=threads,
            progress=lambda message: status.update(message))
    if threads is not None:
        torch.set_num_threads(threads)   # so the machine record says what the run used
    info = bench.machine_info(dev)
    if fmt == "json":
        click.echo(json.dumps({"machine": info, "warmup": warmup, "repeats": repeats,
                               "finite_check": finite_check,
                               "results": [r.as_dict() for r in results]}, indent=2))
        return
    _print_table(results, info, dev, repeats)


def _checked_options(sizes, compressor_list, device):
    """``(sizes in MiB, specs, torch device)``, or BenchError (exit 2) naming the bad option."""
    import torch

    from hvdcomp.bench import compressors as bench
    from hvdcomp.compressors import from_spec

    try:
        size_list = bench.parse_sizes(sizes)
    except ValueError as exc:
        raise BenchError(f"--sizes: {exc}")
    specs = (bench.parse_spec_list(compressor_list) if compressor_list is not None
             else list(bench.DEFAULT_COMPRESSORS))
    if not specs:
        raise BenchError("--compressors: give at least one compressor spec")
    for spec in specs:
        try:
            from_spec(spec)
        except ValueError as exc:
            raise BenchError(f"--compressors: {exc}")
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine")
    except (RuntimeError, ValueError) as exc:
        raise BenchError(f"--device {device!r}: {exc}")
    from hvdcomp.bench.output import check_sizes_fit
    check_sizes_fit(size_list, bench.BUFFERS_PER_MEASUREMENT, str(dev))  # BenchError: exit 2
    return size_list, specs, dev


def _print_table(results, info, dev, repeats) -> None:
    from rich.console import Console
    from rich.table import Table
    road = f", {info['native']}" if "native" in info else ""
    table = Table(title=f"compressors on {info['cpu'] if dev.type == 'cpu' else info.get('gpu')} "
                        f"({info['torch_threads']} threads{road}, median of {repeats})")
    for name in ("compressor", "MiB", "compress GB/s", "decompress GB/s", "c+d GB/s",
                 "memcpy GB/s", "c+d/memcpy", "bits/elem", "formula"):
        table.add_column(name, justify="left" if name == "compressor" else "right")
    for r in results:
        table.add_row(r.compressor, f"{r.size_mib:g}", f"{r.compress_gbps:.3f}",
                      f"{r.decompress_gbps:.3f}", f"{r.roundtrip_gbps:.3f}", f"{r.memcpy_gbps:.2f}",
                      f"{100 * r.roundtrip_vs_memcpy:.1f} %", f"{r.bits_per_element:.4g}",
                      f"{r.formula_bits_per_element:.4g}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)       # piped output: do not squeeze the columns
    console.print(table)
