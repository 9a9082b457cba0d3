"""The ``hvdcomp`` command: a Click group whose subcommands live one per module in this folder.

This folder installs as ``hvdcomp.cli`` (see pyproject.toml), so modules import each other as
``hvdcomp.cli.<name>``. Each subcommand module exposes ``command`` (a Click command or group);
heavy imports (torch, horovod) happen inside the commands so ``hvdcomp --help`` stays fast.

Errors: a :class:`hvdcomp.errors.UserError` escaping any subcommand is printed as one line
(``Error: ...``, ``Error (rank 1): ...`` on another rank) with exit code 2; ``--debug`` or
``HVDCOMP_DEBUG=1`` shows its traceback instead.
"""
from __future__ import annotations

import os
import sys

import click

from hvdcomp import __version__
from hvdcomp.cli import bench, collect, doctor, slurm, train
from hvdcomp.errors import UserError, debug_enabled


def rank_tag() -> str:
    """``""`` on rank 0 or a lone process, ``" (rank R)"`` elsewhere: who is speaking."""
    from hvdcomp.train.config import detect_launcher
    rank = detect_launcher()["rank"]
    return f" (rank {rank})" if rank else ""


class HvdcompGroup(click.Group):
    """Turns a UserError from any subcommand into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if debug_enabled():
                raise
            if exc.shown:
                click.echo(f"Error{rank_tag()}: {exc}", err=True)
            ctx.exit(exc.exit_code)


def _set_debug(ctx, param, value) -> None:
    if value:
        os.environ["HVDCOMP_DEBUG"] = "1"   # read by debug_enabled(), in every subcommand


@click.group(cls=HvdcompGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hvdcomp")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show the traceback of errors (also HVDCOMP_DEBUG=1).")
def cli() -> None:
    """Bidirectional gradient compression with error feedback for Horovod (PyTorch)."""


for _module in (doctor, train, bench, slurm, collect):
    cli.add_command(_module.command)


def main() -> None:
    # Click's standalone mode turns UsageError into exit code 2 and a one-line message.
    sys.exit(cli.main(prog_name="hvdcomp"))


if __name__ == "__main__":
    main()
