"""``hvdcomp collect DIR...``: comparison tables and figures from run directories."""
from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("collect")
@click.argument("dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]),
              default="table", show_default=True, help="Output format.")
@click.option("--target", type=float, default=None,
              help="Target test accuracy for the time-to-accuracy column: 0.9 or 90 (percent).")
@click.option("--group-by", "group_by", multiple=True, metavar="OPTION",
              help="One table (and one set of figures) per value of this config option; repeatable.")
@click.option("--sort-by", "sort_by", multiple=True, metavar="COLUMN",
              help="Sort rows by an option or metric (e.g. final_accuracy); prefix '-' for "
                   "descending; repeatable. Default: the option columns.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write accuracy-vs-epoch/time/bytes figures into this folder (needs matplotlib).")
@click.option("--plot-format", "plot_formats", type=click.Choice(["png", "svg"]), multiple=True,
              default=("png",), show_default=True, help="Figure file format; repeatable.")
def command(dirs, fmt, target, group_by, sort_by, plot_dir, plot_formats) -> None:
    """Compare the runs under DIRS (every folder holding a config.json).

    Running, partial, corrupt and unreadable run directories are listed on stderr and left out.
    A --plot folder that cannot be written stops the command before anything is read (exit 2)."""
    from hvdcomp import collect as c

    try:
        target = c.normalise_target(target)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from None
    if plot_dir is not None:
        c.check_plot_dir(plot_dir)   # CollectError: one line, exit 2, before any output
    runs, skipped = c.load_runs(dirs)
    for s in skipped:
        click.echo(f"skipped ({s.kind}): {s.path}: {s.reason}", err=True)
    if not runs:
        raise click.ClickException(f"no completed runs under {', '.join(map(str, dirs))} "
                                   f"({len(skipped)} skipped)")

    options = c.option_columns(runs)
    known = set(options) | set(c.METRIC_COLUMNS) | {"run"} | {k for r in runs for k in r.config}
    for key in list(group_by) + [k.lstrip("-") for k in sort_by]:
        if c.normalise_key(key) not in known:
            raise click.BadParameter(f"{key!r} is neither a config option of these runs nor a "
                                     f"column; choose from: {', '.join(sorted(known))}",
                                     param_hint="--group-by/--sort-by")
    group_keys = [c.normalise_key(k) for k in group_by]
    # Group columns must be in the rows even when every run has the same value.
    columns = options + [k for k in group_keys if k not in options]
    rows = c.compare(runs, target=target, columns=columns)
    rows = c.sort_rows(rows, list(sort_by) or group_keys + options)
    table_columns = [col for col in c.display_columns(rows, columns) if col not in group_keys]

    if fmt == "json":
        click.echo(c.to_json(rows, skipped))
    elif fmt == "csv":
        click.echo(c.to_csv(rows, ["run"] + columns + [m for m in c.METRIC_COLUMNS if m in rows[0]]),
                   nl=False)
    else:
        groups = c.group_rows(rows, group_keys) if group_keys else [({}, rows)]
        if fmt == "markdown":
            click.echo(c.to_markdown(groups, table_columns))
        else:
            from rich.console import Console
            console = Console(width=max(Console().width, 160))
            for table in c.rich_tables(groups, table_columns):
                console.print(table)

    if plot_dir is not None:
        sys.stdout.flush()  # the table is out before a figure can fail (a full disk)
        written = c.plot(runs, plot_dir, group_by=group_keys, formats=plot_formats)
        click.echo(f"wrote {len(written)} figure(s) to {plot_dir}", err=True)
    sys.stdout.flush()
