"""``hvdcomp collect DIR...``: comparison tables and figures from run directories."""
from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("collect")
@click.argument("dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]),
              default=None, help="Output format  [default: table; csv with --curves].")
@click.option("--curves", is_flag=True,
              help="Print every run's per-step and per-epoch records (loss, accuracy, bytes, "
                   "time components) instead of the summary table; csv or json.")
@click.option("--target", type=float, default=None,
              help="Target test accuracy for the time-to-accuracy column: 0.9 or 90 (percent).")
@click.option("--group-by", "group_by", multiple=True, metavar="OPTION",
              help="One table (and one set of figures) per value of this config option; "
                   "repeatable.")
@click.option("--sort-by", "sort_by", multiple=True, metavar="COLUMN",
              help="Sort rows by a column, spelled as its header with _ for spaces (final_acc, "
                   "bytes_up, vs_psgd, method, seed) or by a config option; prefix '-' for "
                   "descending; repeatable. Default: method, then the option columns.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write figures into this folder: accuracy against epoch, time and bits; loss "
                   "against bits; step-time components; bytes per direction (needs matplotlib).")
@click.option("--plot-format", "plot_formats", type=click.Choice(["png", "svg", "pdf"]),
              multiple=True, default=("png",), show_default=True,
              help="Figure file format; repeatable.")
def command(dirs, fmt, curves, target, group_by, sort_by, plot_dir, plot_formats) -> None:
    """Compare the runs under DIRS (every folder holding a config.json).

    Running, partial, corrupt and unreadable run directories are listed on stderr and left out.
    A --plot folder that cannot be written stops the command before anything is read (exit 2)."""
    from hvdcomp import collect as c
    from hvdcomp import collect_table as t

    if curves and fmt in ("table", "markdown"):
        raise click.BadParameter(f"--curves prints one row per record: use --format csv or json, "
                                 f"not {fmt}", param_hint="--format")
    ignored = [name for name, given in (("--target", target is not None), ("--sort-by", sort_by),
                                        ("--group-by", group_by and plot_dir is None)) if given]
    if curves and ignored:
        verb = "shape" if len(ignored) > 1 else "shapes"
        raise click.BadParameter(f"{' and '.join(ignored)} {verb} the summary table, which "
                                 "--curves does not print; leave them out",
                                 param_hint="--curves")
    fmt = fmt or ("csv" if curves else "table")
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
    if curves:
        _print_curves(c, t, runs, skipped, fmt)
    else:
        _print_table(c, t, runs, skipped, fmt, target, group_by, sort_by)
    if plot_dir is not None:
        sys.stdout.flush()  # the table is out before a figure can fail (a full disk)
        written = c.plot(runs, plot_dir, group_by=[c.normalise_key(k) for k in group_by],
                         formats=plot_formats)
        click.echo(f"wrote {len(written)} figure(s) to {plot_dir}", err=True)
    sys.stdout.flush()


def _resolve(t, keys, known, hint):
    resolved = []
    for key in keys:
        column = t.resolve_column(key.lstrip("-"), known)
        if column is None:
            raise click.BadParameter(f"{key!r} is neither a column nor a config option of these "
                                     f"runs; choose from: {', '.join(t.column_names(known))}",
                                     param_hint=hint)
        resolved.append("-" + column if key.startswith("-") else column)
    return resolved


def _print_table(c, t, runs, skipped, fmt, target, group_by, sort_by) -> None:
    config_keys = list(dict.fromkeys(k for r in runs for k in r.config))
    known = ["run", "method", *c.METRIC_COLUMNS, *config_keys]
    group_keys = _resolve(t, group_by, config_keys, "--group-by")
    sort_keys = _resolve(t, sort_by, known, "--sort-by")
    wanted = group_keys + [k.lstrip("-") for k in sort_keys if k.lstrip("-") in config_keys]
    lay = t.layout(runs, keep=list(dict.fromkeys(wanted)))
    every_option = c.option_columns(runs)
    columns = list(dict.fromkeys(every_option + lay.columns))
    rows = c.compare(runs, target=target, columns=columns)
    rows = c.sort_rows(rows, sort_keys or group_keys + ["method"] + lay.columns)

    if fmt == "json":
        click.echo(t.to_json(rows, skipped))
        return
    if fmt == "csv":
        metrics = [m for m in c.METRIC_COLUMNS if m in rows[0]]
        click.echo(t.to_csv(rows, ["run", "method"] + columns + metrics), nl=False)
        return
    table_columns = [col for col in t.display_columns(rows, lay.columns) if col not in group_keys]
    groups = c.group_rows(rows, group_keys) if group_keys else [({}, rows)]
    notes = t.preamble(lay)
    if fmt == "markdown":
        click.echo(t.to_markdown(groups, table_columns, notes))
        return
    from rich.console import Console
    from hvdcomp.train.progress import is_terminal
    # off a terminal (a file, a pipe): no colour codes, and wide enough that nothing is cut
    console = Console(width=max(Console().width, 160)) if is_terminal() else Console(
        width=240, no_color=True, force_terminal=False)
    for line in notes:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    for table in t.rich_tables(groups, table_columns):
        console.print(table)


def _print_curves(c, t, runs, skipped, fmt) -> None:
    rows, columns = c.curves(runs)
    if fmt == "json":
        click.echo(t.to_json(rows, skipped, what="curves"))
    else:
        click.echo(t.to_csv(rows, columns), nl=False)
