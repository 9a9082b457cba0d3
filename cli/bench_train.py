"""``hvdcomp bench train``: steps/s and samples/s of a model per method, split into compute,
compression and communication, beside a compute-only baseline (no communication library),
Horovod idle, Horovod's own optimizer and, with ``--peer ddp``, PyTorch DDP and its hooks; with
each rank's peak memory.

A launcher: run it without mpirun. Every row starts its own ``--np`` ranks with ``mpirun`` on
this machine, or 2 ranks across an emulated link with ``--link RATE``. The measuring lives in
:mod:`hvdcomp.bench.train` (rows, table), :mod:`hvdcomp.bench.train_launch` (the launches) and
the workers they start.
"""
from __future__ import annotations

import sys
from typing import Dict

import click

from hvdcomp.cli.formats import output_format
from hvdcomp.bench.output import BenchError

from hvdcomp.cli.bench_comm import LINK_HELP, check_out_option, emit, split_list


@click.command("train")
@click.option("--model", default="resnet18", show_default=True,
              help="Model name (hvdcomp.train.models), PreAct-ResNet-18 by default.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Samples per rank per step (synthetic data).")
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(min=4),
              help="Height and width of the synthetic 3-channel images.")
@click.option("--num-classes", default=10, show_default=True, type=click.IntRange(min=2))
@click.option("--algorithms", default="liec,doublesqueeze", show_default=True,
              help="Comma-separated hvdcomp algorithms, or 'none'.")
@click.option("--compressors", default="sign", show_default=True,
              help="Comma-separated uplink compressor specs (cross product with --algorithms).")
@click.option("--baselines", default="horovod", show_default=True,
              help="Comma-separated Horovod optimizer baselines (horovod, horovod-fp16), or "
                   "'none'. The compute-only and horovod-idle rows always run.")
@click.option("--peer", "peers", default="none", show_default=True,
              help="Comma-separated other systems measured in the same run: 'ddp' (PyTorch DDP "
                   "with its default allreduce, fp16_compress_hook and powerSGD_hook), "
                   "'hvdcomp-ddp' (every hvdcomp row again through DDP with hvdcomp.ddp's hook), "
                   "or 'none'.")
@click.option("--powersgd-rank", default=1, show_default=True, type=click.IntRange(min=1),
              help="matrix_approximation_rank of the DDP powerSGD_hook row.")
@click.option("--pattern", default=None,
              type=click.Choice(["two_phase", "allgather", "allreduce"]),
              help="Exchange pattern of the hvdcomp rows (default: the optimizer's).")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0),
              help="Untimed steps per row.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1),
              help="Timed steps per row.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--np", "np_", default=2, show_default=True, type=click.IntRange(min=1),
              help="Ranks per row (mpirun on this machine; --link needs 2).")
@click.option("--row-timeout", default=1800, show_default=True, type=click.IntRange(min=1),
              help="Seconds one row may take before its ranks are stopped and the run fails.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the JSON to this file (checked before measuring, written "
                   "atomically at the end).")
@click.option("--link", default=None, help=LINK_HELP)
@output_format
def command(model, batch_size, image_size, num_classes, algorithms, compressors, baselines,
            peers, powersgd_rank, pattern, warmup, steps, seed, np_, row_timeout, fmt, out, link):
    """Training throughput per method, with compute / compression / communication per step and
    each rank's peak memory. Launches its own ranks: run it without mpirun."""
    as_json = fmt == "json"
    from hvdcomp.bench import train as rows
    from hvdcomp.bench.train_launch import bench_train, check_can_launch
    from hvdcomp.train.config import detect_launcher
    from hvdcomp.train.models import check_model_name

    launcher = detect_launcher()
    if launcher["name"] != "single":
        raise BenchError(f"bench train starts its own ranks (each row in its own processes), but "
                         f"this process was started by {launcher['name']}: run `hvdcomp bench "
                         "train` without it (--np N ranks here, or --link RATE)")
    try:
        check_model_name(model)
    except ValueError as exc:
        raise BenchError(f"--model: {exc}")
    none = lambda text: [] if text.strip().lower() == "none" else split_list(text)  # noqa: E731
    try:
        methods = rows.plan_train_methods(none(algorithms), split_list(compressors),
                                          none(baselines), none(peers), powersgd_rank, pattern)
    except ValueError as exc:
        raise BenchError(str(exc))
    out = check_out_option(out)
    check_can_launch(np_, link)
    spec = dict(model=model, batch_size=batch_size, image_size=image_size,
                num_classes=num_classes, warmup=warmup, steps=steps, seed=seed, pattern=pattern,
                device="cpu")
    progress = lambda m: click.echo(f"  measuring {m}", err=True)  # noqa: E731 (stderr)
    try:
        payload = bench_train(methods, spec, np_, link, row_timeout, progress)
    except KeyboardInterrupt:
        click.echo("interrupted: ranks stopped", err=True)
        sys.exit(130)
    emit(payload, as_json, out, lambda: train_table(payload))
    for failure in payload["failed_rows"]:    # after the rows that were measured, not instead
        click.echo(f"Error: {failure['error']}", err=True)
    if payload["failed_rows"]:
        sys.exit(1)


def train_table(payload: Dict[str, object]):
    from rich.markup import escape
    from rich.table import Table

    from hvdcomp.bench.train import COLUMNS, header_lines, row_cells

    first = payload["results"][0]
    title = (f"{first['model']} ({first['parameters']:,} parameters), batch "
             f"{first['batch_size']}/rank (means of {payload['steps']} steps)\n"
             + "\n".join(header_lines(payload)))
    table = Table(title=title)
    for name in COLUMNS:
        table.add_column(name, justify="left" if name == "method" else "right")
    for cells in row_cells(payload):
        table.add_row(*(escape(c) for c in cells))
    return table
