"""``--format table|json``: how every hvdcomp command with machine-readable output spells it.

``--json`` stays as a hidden alias of ``--format json`` for scripts written before.
"""
from __future__ import annotations

import functools

import click


def output_format(command):
    """Adds ``--format`` (and the hidden ``--json``) to ``command``, which receives ``fmt``."""
    @click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                  show_default=True, help="json: machine-readable, on stdout.")
    @click.option("--json", "json_alias", is_flag=True, hidden=True)
    @functools.wraps(command)
    def wrapper(*args, fmt: str, json_alias: bool, **kwargs):
        return command(*args, fmt="json" if json_alias else fmt, **kwargs)
    return wrapper
