"""``hvdcomp slurm``: sweep specs (jobs/*.toml) as Slurm jobs. See docs/slurm.md.

Errors: a bad spec (every problem, one ``file:line: key: problem`` line each) or a missing Slurm
command ends with exit code 2, a submission Slurm refuses with exit code 1; both as one message
printed by the ``hvdcomp`` group (hvdcomp.errors.UserError), never a traceback."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import click

from hvdcomp.cli.formats import output_format

SPEC = click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
OUT = click.option("--out", "output", type=click.Path(file_okay=False, path_type=Path),
                   default=None, help="Sweep directory (default: [sweep] output of the spec).")


def _load(spec_path: Path, check_values: bool = True):
    """The spec, checked completely (SpecError lists every problem; nothing is written before).
    ``check_values``: also check the values the way hvdcomp train will (render, submit).
    A SPEC that is no file but the name of a shipped example (``smoke-digits``) is that example."""
    from hvdcomp.shipped_files import resolve_spec
    from hvdcomp.sweep import load_spec
    from hvdcomp.slurm_render import sweep_paths
    spec = load_spec(resolve_spec(spec_path), validator=None if check_values else False)
    return spec, sweep_paths


@click.group("slurm")
def command() -> None:
    """Render, submit, wait for, watch and cancel the Slurm jobs of a sweep spec.

    SPEC is a sweep spec file, or the name of a shipped example (`hvdcomp slurm examples`)."""


@command.command("render")
@SPEC
@OUT
@click.option("--dry-run", is_flag=True, help="Print the scripts instead of writing them.")
def render_cmd(spec: Path, output, dry_run: bool) -> None:
    """Write one sbatch script per sweep point to OUTPUT/scripts/."""
    from hvdcomp.slurm_render import render
    sweep, sweep_paths = _load(spec)
    paths = sweep_paths(sweep, output)
    scripts = render(sweep, paths, write=not dry_run)
    click.echo(f"# {sweep.name}: {len(scripts)} points, train options checked against "
               f"{sweep.train_options.source}{_values_note()}", err=True)
    for script in scripts:
        if dry_run:
            click.echo(f"# ===== {script.path}")
            click.echo(script.text)
        else:
            click.echo(str(script.path))


def _values_note() -> str:
    from hvdcomp.sweep_check import TrainValidator
    reason = TrainValidator().reason
    return f"; values NOT checked: {reason}" if reason else ", values checked as hvdcomp train will"


@command.command("submit")
@SPEC
@OUT
@click.option("--dry-run", is_flag=True, help="Say what would be submitted; submit nothing.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None, metavar="K",
              help="At most K jobs of each job array run at once (sbatch --array=...%K); "
                   "default: [cluster] max-concurrent, else no cap.")
@click.option("--sbatch-arg", "sbatch_args", multiple=True,
              help="Extra argument for sbatch (repeatable), e.g. --sbatch-arg=--hold.")
@output_format
def submit_cmd(spec: Path, output, dry_run: bool, max_concurrent, sbatch_args, fmt: str) -> None:
    """Submit every point not finished and not already queued or running, as job arrays (one
    per group of points that ask for the same resources)."""
    from hvdcomp.slurmjobs import submit
    sweep, sweep_paths = _load(spec)
    paths = sweep_paths(sweep, output)

    def report(outcome):
        if fmt == "table":
            job = f" job {outcome.job_id}" if outcome.job_id else ""
            click.echo(f"{outcome.point}: {outcome.action}{job}")
    outcomes = submit(sweep, paths, dry_run=dry_run, sbatch_args=sbatch_args, on_outcome=report,
                      max_concurrent=max_concurrent)
    if fmt == "json":
        click.echo(json.dumps([asdict(o) for o in outcomes], indent=2))
    click.echo(f"job records: {paths.jobs}", err=True)


@command.command("status")
@SPEC
@OUT
@output_format
def status_cmd(spec: Path, output, fmt: str) -> None:
    """A table of job states (squeue / scontrol / sacct), exit codes and output files."""
    from hvdcomp.slurmjobs import status
    sweep, sweep_paths = _load(spec, check_values=False)
    rows = status(sweep, sweep_paths(sweep, output))
    if fmt == "json":
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    _print_table(f"{sweep.name} ({len(rows)} points)", rows)


def _print_table(title: str, rows) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for column in ("point", "job", "state", "exit", "run", "output"):
        table.add_column(column, overflow="fold")
    colours = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "FAILED": "red",
               "CANCELLED": "magenta", "TIMEOUT": "red", "OUT_OF_MEMORY": "red"}
    for r in rows:
        state = r.state + (f" ({r.reason})" if r.reason else "")
        colour = colours.get(r.state)
        table.add_row(r.point, r.job_id or "-", f"[{colour}]{state}[/]" if colour else state,
                      r.exit_code or "-", r.run, r.log or "-")
    Console(width=max(Console().width, 160)).print(table)


@command.command("cancel")
@SPEC
@OUT
def cancel_cmd(spec: Path, output) -> None:
    """scancel the sweep's jobs that are still pending or running."""
    from hvdcomp.slurmjobs import cancel
    sweep, sweep_paths = _load(spec, check_values=False)
    cancelled = cancel(sweep, sweep_paths(sweep, output))
    click.echo(f"cancelled {len(cancelled)} job(s)"
               + (f": {' '.join(cancelled)}" if cancelled else ""))


@command.command("wait")
@SPEC
@OUT
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Give up (exit 1) after this long; default: wait until every job ended.")
@click.option("--poll", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              metavar="SECONDS", help="Longest pause between two looks at the queue.")
@output_format
def wait_cmd(spec: Path, output, timeout, poll: float, fmt: str) -> None:
    """Block until the sweep's jobs have ended, printing progress; then the status table.
    Exit code 0 when every point completed, 1 when any failed, timed out, was cancelled or
    was never submitted (they are listed)."""
    from hvdcomp.slurmwait import failed, wait
    sweep, sweep_paths = _load(spec, check_values=False)
    paths = sweep_paths(sweep, output)

    def report(progress):
        click.echo(f"[{sweep.name}] {progress.line()}", err=True)
    rows = wait(sweep, paths, timeout=timeout, poll=min(2.0, poll), max_poll=poll,
                on_progress=report)
    if fmt == "json":
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        _print_table(f"{sweep.name} ({len(rows)} points)", rows)
    bad = failed(rows)
    if bad:
        click.echo(f"{len(bad)} of {len(rows)} points did not complete: "
                   + ", ".join(f"{r.point} ({r.state} {r.exit_code or ''})".replace(" )", ")")
                               for r in bad), err=True)
        sys.exit(1)


@command.command("logs")
@SPEC
@click.argument("point")
@OUT
@click.option("--tail", type=click.IntRange(min=1), default=None, metavar="N",
              help="Only the last N lines.")
def logs_cmd(spec: Path, point: str, output, tail) -> None:
    """Print the output of POINT's latest job (its path on stderr)."""
    from hvdcomp.slurmwait import point_log
    sweep, sweep_paths = _load(spec, check_values=False)
    log = point_log(sweep, sweep_paths(sweep, output), point)
    if log is None:
        click.echo(f"{point}: no output yet (the job has not started; "
                   f"`hvdcomp slurm status {spec}`)", err=True)
        return
    click.echo(f"# {log}", err=True)
    text = log.read_text(errors="replace")
    lines = text.splitlines(keepends=True)
    click.echo("".join(lines[-tail:] if tail else lines), nl=False)


@command.command("examples")
@click.option("--copy", "copy_to", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Copy the example specs (and the single-node cluster scripts, "
                                  "to DIR/cluster) into DIR, to edit them.")
def examples_cmd(copy_to) -> None:
    """List the example sweep specs that ship with hvdcomp (usable by name as SPEC)."""
    from hvdcomp.errors import UserError
    from hvdcomp.shipped_files import example_specs, shipped_dir
    examples = example_specs()
    if copy_to is None:
        for name, path in examples.items():
            click.echo(f"{name:28s} {path}")
        return
    try:
        copy_to.mkdir(parents=True, exist_ok=True)
        for path in examples.values():
            shutil.copyfile(path, copy_to / path.name)
        shutil.copytree(shipped_dir("cluster"), copy_to / "cluster", dirs_exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot copy the examples to {copy_to}: {exc.strerror or exc}") from None
    click.echo(f"copied {len(examples)} specs and cluster/start.sh, cluster/stop.sh to {copy_to}")
