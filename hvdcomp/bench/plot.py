"""Step time against link bandwidth, one line per method, from ``hvdcomp bench train --json``
documents taken at different ``--link`` rates.

    python -m hvdcomp.bench.plot --out docs/img/step_time_vs_bandwidth.png \\
        runs/train-100mbit.json runs/train-1gbit.json runs/train-unshaped.json

Each document's ``link`` (``"1gbit"``, ``"unshaped"``, or null when not emulated) places it on the
x axis (bits/s, log scale); unshaped and non-emulated runs sit at the right end, labelled, at 10×
the fastest shaped rate (a veth without a qdisc is limited by the CPU, not by a rate). Needs
matplotlib (the ``plot`` extra).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..netns import parse_rate

Series = Dict[str, List[Tuple[Optional[int], float]]]


def load(paths: Sequence[str]) -> List[dict]:
    docs = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        if "results" not in doc or not all("step_s" in r for r in doc["results"]):
            raise ValueError(f"{path} is not the JSON of `hvdcomp bench train --json`")
        docs.append(doc)
    return docs


def series(docs: Sequence[dict]) -> Series:
    """``{method: [(link bits/s or None for unshaped, step seconds), ...]}`` sorted by bandwidth
    (None last); a method measured twice at the same link keeps both points."""
    out: Series = {}
    for doc in docs:
        bits = parse_rate(doc["link"]) if doc.get("link") else None
        for row in doc["results"]:
            out.setdefault(row["method"], []).append((bits, row["step_s"]))
    for points in out.values():
        points.sort(key=lambda p: (p[0] is None, p[0] or 0))
    return out


def _label(bits: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"


def plot_step_time_vs_bandwidth(docs: Sequence[dict], path: str,
                                title: Optional[str] = None) -> Path:
    """Write the figure to ``path`` (PNG, SVG... by suffix) and return the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(docs)
    shaped = sorted({b for points in data.values() for b, _ in points if b is not None})
    unshaped_x = 10 * shaped[-1] if shaped else 1e10
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method, points in data.items():
        xs = [unshaped_x if b is None else b for b, _ in points]
        ys = [1e3 * t for _, t in points]
        style = dict(linestyle="--", color="black") if method in ("ideal", "compute-only") \
            else dict(marker="o")
        axes.plot(xs, ys, label=method, **style)
    ticks = shaped + ([unshaped_x] if any(b is None for p in data.values() for b, _ in p) else [])
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(ticks)
    axes.set_xticklabels([_label(t) if t != unshaped_x or t in shaped else "unshaped"
                          for t in ticks])
    # a few labelled ticks per decade, no unlabelled minor ones (a log axis within one decade
    # would otherwise show no number at all)
    from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter
    axes.xaxis.set_minor_locator(NullLocator())
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("link bandwidth (tc tbf on a veth, both directions)")
    axes.set_ylabel("time per training step (ms)")
    first = docs[0]["results"][0] if docs else {}
    axes.set_title(title or f"{first.get('model', '')}, batch {first.get('batch_size', '')}/rank, "
                            f"{first.get('world_size', '')} ranks")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON files of `hvdcomp bench train --json`")
    parser.add_argument("--out", default="docs/img/step_time_vs_bandwidth.png")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    print(plot_step_time_vs_bandwidth(load(args.runs), args.out, args.title))


if __name__ == "__main__":
    main()
