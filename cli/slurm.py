"""``hvdcomp slurm``: sweep specs (jobs/*.toml) as Slurm jobs. See docs/slurm.md.

Errors: a bad spec (every problem, one ``file:line: key: problem`` line each) or a missing Slurm
command ends with exit code 2, a submission Slurm refuses with exit code 1; both as one message
printed by the ``hvdcomp`` group (hvdcomp.errors.UserError), never a traceback."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

SPEC = click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
OUT = click.option("--out", "output", type=click.Path(file_okay=False, path_type=Path), default=None,
                   help="Sweep directory (default: [sweep] output of the spec).")


def _load(spec_path: Path, check_values: bool = True):
    """The spec, checked completely (SpecError lists every problem; nothing is written before).
    ``check_values``: also check the values the way hvdcomp train will (render, submit)."""
    from hvdcomp.sweep import load_spec
    from hvdcomp.slurmjobs import sweep_paths
    spec = load_spec(spec_path, validator=None if check_values else False)
    return spec, sweep_paths


@click.group("slurm")
def command() -> None:
    """Render, submit, watch and cancel the Slurm jobs of a sweep spec."""


@command.command("render")
@SPEC
@OUT
@click.option("--dry-run", is_flag=True, help="Print the scripts instead of writing them.")
def render_cmd(spec: Path, output, dry_run: bool) -> None:
    """Write one sbatch script per sweep point to OUTPUT/scripts/."""
    from hvdcomp.slurmjobs import render
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
@click.option("--sbatch-arg", "sbatch_args", multiple=True,
              help="Extra argument for sbatch (repeatable), e.g. --sbatch-arg=--hold.")
def submit_cmd(spec: Path, output, dry_run: bool, sbatch_args) -> None:
    """Submit every point not finished and not already queued or running (sbatch --parsable)."""
    from hvdcomp.slurmjobs import submit
    sweep, sweep_paths = _load(spec)
    paths = sweep_paths(sweep, output)

    def report(outcome):
        job = f" job {outcome.job_id}" if outcome.job_id else ""
        click.echo(f"{outcome.point}: {outcome.action}{job}")
    submit(sweep, paths, dry_run=dry_run, sbatch_args=sbatch_args, on_outcome=report)
    click.echo(f"job records: {paths.jobs}", err=True)


@command.command("status")
@SPEC
@OUT
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def status_cmd(spec: Path, output, fmt: str) -> None:
    """A table of job states (squeue / scontrol / sacct), exit codes and output files."""
    from hvdcomp.slurmjobs import status
    sweep, sweep_paths = _load(spec, check_values=False)
    rows = status(sweep, sweep_paths(sweep, output))
    if fmt == "json":
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{sweep.name} ({len(rows)} points)")
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
    click.echo(f"cancelled {len(cancelled)} job(s)" + (f": {' '.join(cancelled)}" if cancelled else ""))
