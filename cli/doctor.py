"""``hvdcomp doctor``: versions, Horovod's build, and a 2-rank smoke test."""
from __future__ import annotations

import dataclasses
import json
import sys

import click


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the facts and checks as JSON.")
@click.option("--no-ranks", is_flag=True, help="Skip starting 2 ranks (versions only).")
def command(as_json: bool, no_ranks: bool) -> None:
    """Check the environment: versions, Horovod's build, and that 2 ranks reach each other.

    Exits 0 only when everything works; otherwise names what is missing and the fix."""
    from hvdcomp.doctor import run_checks

    checks, facts = run_checks(ranks=not no_ranks)
    ok = all(c.ok for c in checks)
    if as_json:
        click.echo(json.dumps({"ok": ok, "checks": [dataclasses.asdict(c) for c in checks],
                               "facts": facts}, indent=2, default=str))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="hvdcomp doctor", show_lines=False)
        table.add_column("check")
        table.add_column("")
        table.add_column("detail", overflow="fold")
        for c in checks:
            table.add_row(c.name, "[green]ok[/]" if c.ok else "[red]FAIL[/]", c.detail)
        console = Console()
        console.print(table)
        for c in checks:
            if not c.ok:
                console.print(f"[red]{c.name}[/]: {c.detail}\n  fix: {c.fix}", soft_wrap=True)
    sys.exit(0 if ok else 1)
