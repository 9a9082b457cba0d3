"""The ``hvdcomp`` command: a Click group whose subcommands live one per module in this folder.

This folder installs as ``hvdcomp.cli`` (see pyproject.toml), so modules import each other as
``hvdcomp.cli.<name>``. Each subcommand module exposes ``command`` (a Click command or group);
heavy imports (torch, horovod) happen inside the commands so ``hvdcomp --help`` stays fast.
"""
from __future__ import annotations

import sys

import click

from hvdcomp import __version__
from hvdcomp.cli import bench, collect, doctor, slurm, train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hvdcomp")
def cli() -> None:
    """Bidirectional gradient compression with error feedback for Horovod (PyTorch)."""


for _module in (doctor, train, bench, slurm, collect):
    cli.add_command(_module.command)


def main() -> None:
    # Click's standalone mode turns UsageError into exit code 2 and a one-line message.
    sys.exit(cli.main(prog_name="hvdcomp"))


if __name__ == "__main__":
    main()
