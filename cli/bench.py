"""``hvdcomp bench``: a Click group of measurements, one subcommand per ``cli/bench_*.py``."""
from __future__ import annotations

import click

from hvdcomp.cli import bench_comm, bench_compressors, bench_train


@click.group("bench")
def command() -> None:
    """Measure compressors, collectives and training throughput."""


for _module in (bench_compressors, bench_comm, bench_train):
    command.add_command(_module.command)
