"""``hvdcomp bench``: a Click group of measurements, one subcommand per ``cli/bench_*.py`` module
(each exposes ``command``); a module that does not exist yet is simply not offered."""
from __future__ import annotations

import importlib

import click

BENCH_SUBCOMMANDS = ["bench_compressors", "bench_comm", "bench_train"]


@click.group("bench")
def command() -> None:
    """Measure compressors, collectives and training throughput."""


for _name in BENCH_SUBCOMMANDS:
    try:
        _module = importlib.import_module(f"hvdcomp.cli.{_name}")
    except ModuleNotFoundError as exc:  # only our own module may be missing, never a dependency
        if exc.name != f"hvdcomp.cli.{_name}":
            raise
        continue
    command.add_command(_module.command)
