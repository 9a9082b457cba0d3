"""``hvdcomp bench train``: steps/s and samples/s of a model per algorithm, split into compute,
compression and communication, beside the compute-only ideal and Horovod's own optimizer.

Runs inside ranks (``mpirun -np 2 hvdcomp bench train``), or with ``--link RATE`` launches 2 ranks
across an emulated link itself (see ``hvdcomp bench comm --help``). The measuring lives in
:mod:`hvdcomp.bench.train`.
"""
from __future__ import annotations

import os
from typing import Dict

import click

from hvdcomp.cli.formats import output_format
from hvdcomp.bench.output import BenchError

from hvdcomp.cli.bench_comm import (LINK_HELP, check_out_option, emit, init_horovod,
                                    relaunch_over_link, split_list)


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
                   "'none'. The compute-only ideal always runs.")
@click.option("--pattern", default=None,
              type=click.Choice(["two_phase", "allgather", "allreduce"]),
              help="Exchange pattern of the hvdcomp rows (default: the optimizer's).")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0),
              help="Untimed steps per method.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1),
              help="Timed steps per method.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the JSON to this file (checked before measuring, written "
                   "atomically at the end).")
@click.option("--link", default=None, help=LINK_HELP)
@output_format
def command(model, batch_size, image_size, num_classes, algorithms, compressors, baselines,
            pattern, warmup, steps, seed, fmt, out, link):
    """Training throughput per method, with compute / compression / communication per step."""
    as_json = fmt == "json"
    from hvdcomp.bench import train as bench
    from hvdcomp.train.models import check_model_name

    try:
        check_model_name(model)
    except ValueError as exc:
        raise BenchError(f"--model: {exc}")
    out = check_out_option(out)
    none = lambda text: [] if text.strip().lower() == "none" else split_list(text)  # noqa: E731
    try:
        methods = bench.plan_train_methods(none(algorithms), split_list(compressors),
                                           none(baselines))
    except ValueError as exc:
        raise BenchError(str(exc))
    if link is not None:
        relaunch_over_link(link, ["train"], dict(
            model=model, batch_size=batch_size, image_size=image_size, num_classes=num_classes,
            algorithms=algorithms, compressors=compressors, baselines=baselines, pattern=pattern,
            warmup=warmup, steps=steps, seed=seed, json=as_json,
            out=out))

    hvd = init_horovod()
    info = bench.run_info(hvd)
    progress = (lambda m: click.echo(f"  measuring {m}", err=True)) \
        if hvd.rank() == 0 and not as_json else (lambda m: None)
    results = bench.bench_train(hvd, methods, model, batch_size, image_size, num_classes,
                                warmup, steps, seed, pattern, progress=progress)
    info["loadavg_end"] = list(os.getloadavg())
    if hvd.rank() == 0:
        payload = {**info, "warmup": warmup, "steps": steps, "results": [r.as_dict() for r in results]}
        emit(payload, as_json, out, lambda: train_table(payload))
    hvd.shutdown()


def train_table(payload: Dict[str, object]):
    from rich.markup import escape
    from rich.table import Table

    first = payload["results"][0]
    link = payload.get("link") or "no emulated link"
    table = Table(title=f"{first['model']} ({first['parameters']:,} parameters), batch "
                        f"{first['batch_size']}/rank, {payload['world_size']} ranks, link: {link} "
                        f"(means of {payload['steps']} steps)")
    for name in ("method", "step ms", "compute ms", "compress ms", "comm ms", "steps/s",
                 "samples/s", "vs ideal", "up B/step", "down B/step"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for r in payload["results"]:
        table.add_row(escape(r["method"]), f"{1e3 * r['step_s']:.1f}", f"{1e3 * r['compute_s']:.1f}",
                      f"{1e3 * r['compress_s']:.1f}", f"{1e3 * r['comm_s']:.1f}",
                      f"{r['steps_per_s']:.2f}", f"{r['samples_per_s']:.1f}",
                      "" if r["vs_ideal"] is None else f"{100 * r['vs_ideal']:.0f} %",
                      f"{r['bytes_up']:,.0f}", f"{r['bytes_down']:,.0f}")
    return table
