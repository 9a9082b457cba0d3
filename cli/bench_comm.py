"""``hvdcomp bench comm``: time of one compressed exchange against Horovod's allreduces.

Runs inside ranks (``mpirun -np 2 hvdcomp bench comm ...``); rank 0 prints. With ``--link RATE``
it is a launcher instead: it builds a two-namespace emulated cluster (:mod:`hvdcomp.netns`), runs
``mpirun ... hvdcomp bench comm <same options>`` across it and removes it afterwards. The
measuring lives in :mod:`hvdcomp.bench.comm`.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import click

from hvdcomp.cli.formats import output_format
from hvdcomp.bench.output import BenchError

LINK_HELP = ("Launch 2 ranks across an emulated link of this rate (e.g. 1gbit, 100mbit, or "
             "'unshaped'): two network namespaces joined by a veth shaped with tc tbf. Root only; "
             "needs ip, tc, mpirun, unshare.")


# --- shared with cli/bench_train.py ---------------------------------------------------------------
def split_list(text: str) -> List[str]:
    from hvdcomp.bench.compressors import parse_spec_list
    return parse_spec_list(text)


def parse_sizes_option(text: str) -> List[float]:
    from hvdcomp.bench.compressors import parse_sizes
    try:
        return parse_sizes(text)
    except ValueError as exc:
        raise BenchError(f"--sizes: {exc}")


def relaunch_over_link(link: str, subcommand: Sequence[str], options: Dict[str, object]) -> None:
    """Run ``hvdcomp bench <subcommand> <options>`` in 2 ranks across an emulated link and exit
    with mpirun's exit code; BenchError (exit 2) when the link cannot be built here."""
    from hvdcomp import netns

    try:
        netns.parse_rate(link)
        netns.check_can_emulate()
    except (ValueError, netns.LinkError) as exc:
        raise BenchError(f"--link: {exc}")
    argv = [sys.executable, "-m", "hvdcomp.cli.main", "bench", *subcommand]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, str(value)]
    env = dict(os.environ)
    # one rank per "node" on a shared machine: do not let each rank take every core
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HOROVOD_LOG_LEVEL", "warning")
    try:
        code = netns.run_across_link(link, argv, env=env)
    except netns.LinkError as exc:
        raise click.ClickException(f"--link {link}: {exc}")
    sys.exit(code)


def start_horovod():
    """``hvd.init()`` and Horovod's communicator; the measuring speaks only to the latter."""
    from hvdcomp.train.engine import horovod_problem
    problem = horovod_problem()
    if problem:
        raise click.ClickException(f"{problem}; run scripts/setup.sh")
    from hvdcomp.comm import HorovodCommunicator
    return HorovodCommunicator.start()


def check_out_option(out: Optional[str]) -> Optional[str]:
    """Before measuring: ``--out`` can be written (on rank 0, the one that writes it; the
    launcher ends the other ranks when it exits 2). Returns it as an absolute path."""
    if out is None:
        return None
    from hvdcomp.bench.output import check_output_file
    from hvdcomp.train.config import detect_launcher
    if detect_launcher()["rank"] != 0:
        return os.path.abspath(out)
    return str(check_output_file(out))


def check_sizes_option(size_list: List[float], buffers: float) -> None:
    """Every --sizes entry fits in memory, counting every rank this node runs."""
    from hvdcomp.bench.output import check_sizes_fit
    from hvdcomp.train.config import detect_launcher
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")
    ranks_here = int(local) if local and local.isdigit() else detect_launcher()["world_size"]
    check_sizes_fit(size_list, buffers * max(1, ranks_here))


#: Memory one rank of `bench comm` takes, in buffers of the --sizes size (the gradient, the
#: algorithm's error memories, payloads and decoded chunks): measured, the peak RSS of one rank
#: with the default methods grew by 10 buffers from 16 to 128 MiB.
COMM_BUFFERS_PER_RANK = 10


def emit(payload: Dict[str, object], as_json: bool, out: Optional[str], table) -> None:
    """Rank 0's output: JSON or a rich table on stdout, and the JSON in ``out`` if given (written
    last and atomically; if that fails the JSON goes to stdout too, so nothing measured is
    lost, and the command exits 2)."""
    text = json.dumps(payload, indent=2)
    if as_json:
        click.echo(text)
    else:
        from rich.console import Console
        console = Console()
        if not os.environ.get("COLUMNS") and (not console.is_terminal
                                              or "OMPI_COMM_WORLD_RANK" in os.environ):
            # under mpirun stdout is a pipe or an 80-column pty: do not squeeze the table
            console = Console(width=180)
        console.print(table())
    if out:
        from hvdcomp.bench.output import BenchError, write_results
        try:
            write_results(out, text)
        except BenchError:
            if not as_json:
                click.echo(text)
            raise


# --- the command -------------------------------------------------------------------------------
@click.command("comm")
@click.option("--sizes", default="1,4,16,64,256", show_default=True,
              help="Comma-separated fp32 buffer sizes in MiB (each must fit in the memory "
                   "available; checked before measuring).")
@click.option("--algorithms", default="liec,doublesqueeze,memsgd", show_default=True,
              help="Comma-separated algorithms (hvdcomp.algorithms), or 'none' for baselines only.")
@click.option("--compressors", default="sign,topk:ratio=0.01", show_default=True,
              help="Comma-separated uplink compressor specs (a key=value after a comma continues "
                   "the previous spec); the downlink uses the same unless the algorithm sends it "
                   "dense.")
@click.option("--patterns", default="two_phase,allgather", show_default=True,
              help="Comma-separated exchange patterns: two_phase, allgather, allreduce.")
@click.option("--baselines", default="horovod,horovod-fp16", show_default=True,
              help="Comma-separated Horovod baselines (horovod, horovod-fp16), or 'none'.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0),
              help="Untimed rounds per row.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed rounds per row (median, min, max reported).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the buffers.")
@click.option("--iface", default="mpi0", show_default=True,
              help="Network interface whose tx counter is reported, when it exists.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the JSON to this file (checked before measuring, written "
                   "atomically at the end).")
@click.option("--link", default=None, help=LINK_HELP)
@output_format
def command(sizes, algorithms, compressors, patterns, baselines, warmup, repeats, seed, iface,
            fmt, out, link):
    """Time, algbw/busbw and bytes per rank of one exchange per algorithm × compressor × pattern,
    beside Horovod's allreduce and fp16 allreduce. Run under mpirun, or with --link."""
    as_json = fmt == "json"
    from hvdcomp.bench import comm as bench

    size_list = parse_sizes_option(sizes)
    out = check_out_option(out)
    none = lambda text: [] if text.strip().lower() == "none" else split_list(text)  # noqa: E731
    try:
        methods = bench.plan_methods(none(algorithms), none(compressors) or ["none"],
                                     split_list(patterns), none(baselines))
    except ValueError as exc:
        raise BenchError(str(exc))
    if not methods:
        raise BenchError("nothing to measure: give --algorithms or --baselines")
    if link is None:
        check_sizes_option(size_list, COMM_BUFFERS_PER_RANK)
    if link is not None:
        relaunch_over_link(link, ["comm"], dict(
            sizes=sizes, algorithms=algorithms, compressors=compressors, patterns=patterns,
            baselines=baselines, warmup=warmup, repeats=repeats, seed=seed, iface=iface,
            json=as_json, out=out))

    comm = start_horovod()
    if comm.size < 2 and comm.rank == 0:
        click.echo("warning: 1 rank, nothing crosses a link; run under `mpirun -np 2` or with "
                   "--link", err=True)
    from hvdcomp.threads import share_cores
    threads = share_cores(comm.local_size)     # as hvdcomp train does: ranks share the cores
    info = bench.run_info(comm)
    info["threads_per_rank"] = threads
    from hvdcomp.horovod_settings import settings_in_force
    info["horovod_settings"] = settings_in_force()      # what this rank's Horovod read
    status = _progress(comm.rank == 0 and not as_json)
    results = bench.bench_comm(comm, size_list, methods, warmup=warmup, repeats=repeats,
                               seed=seed, iface=iface, progress=status)
    info["loadavg_end"] = list(os.getloadavg())
    if comm.rank == 0:
        payload = {**info, "warmup": warmup, "repeats": repeats,
                   "results": [r.as_dict() for r in results]}
        emit(payload, as_json, out, lambda: comm_table(payload))
    comm.hvd.shutdown()


def _progress(enabled: bool):
    if not enabled:
        return lambda message: None
    return lambda message: click.echo(f"  measuring {message}", err=True)


def comm_table(payload: Dict[str, object]):
    """The rich table of a ``bench comm`` JSON document (also used by the docs)."""
    from rich.markup import escape
    from rich.table import Table

    link = payload.get("link") or "no emulated link"
    from hvdcomp.horovod_settings import describe

    settings = describe(payload.get("horovod_settings", {}))
    threads = payload.get("threads_per_rank")
    table = Table(title=f"exchange of one buffer, {payload['world_size']} ranks"
                        + (f" ({threads} thread{'s' * (threads != 1)} each)" if threads else "")
                        + f", link: {link} "
                        f"(median of {payload['repeats']}; bytes per rank per round)"
                        + (f"\nHorovod settings: {settings}" if settings else ""))
    for name in ("method", "MiB", "time ms", "min–max ms", "algbw GB/s", "busbw GB/s",
                 "vs horovod", "up B", "down B", "formula up/down B", "bytes"):
        table.add_column(name, justify="left" if name in ("method", "bytes") else "right")
    for r in payload["results"]:
        speedup = r.get("speedup_vs_horovod")
        table.add_row(
            escape(r["method"]), f"{r['size_mib']:g}", f"{1e3 * r['time_median_s']:.2f}",
            f"{1e3 * r['time_min_s']:.2f}–{1e3 * r['time_max_s']:.2f}",
            f"{r['algbw_gbps']:.3f}", f"{r['busbw_gbps']:.3f}",
            "" if speedup is None else f"{speedup:.1f}×",
            f"{r['bytes_up']:,.0f}", f"{r['bytes_down']:,.0f}",
            f"{r['formula_up']:,.0f}/{r['formula_down']:,.0f}",
            "ok" if r["bytes_ok"] else "[red]MISS >2 %[/red]")
    return table
