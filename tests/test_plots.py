"""The figures of ``hvdcomp collect --plot``, rendered and measured with matplotlib's own renderer:
every label and legend entry lies inside the figure, legends name methods as their papers do,
communication axes are logarithmic, seeds are averaged, and bars hold the runs' numbers
(expected values computed here from the fixture's numbers)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvdcomp import collect, plots
from test_collect import write_run

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

TIMES = {"steps": 30, "time_compute": 0.3, "time_compress": 0.15, "time_comm": 0.9}


def _runs(root: Path):
    write_run(root, "psgd-s0", {"algorithm": "psgd", "up": "none", "down": "none", "seed": 0},
              [0.50, 0.80, 0.90], (1000, 1000), summary_extra=TIMES)
    write_run(root, "psgd-s1", {"algorithm": "psgd", "up": "none", "down": "none", "seed": 1},
              [0.60, 0.84, 0.92], (1000, 1000), summary_extra=TIMES)
    write_run(root, "liec-s0", {"algorithm": "liec", "up": "sign", "down": "sign", "seed": 0},
              [0.40, 0.85, 0.88], (40, 40), seconds_per_epoch=0.5, summary_extra=TIMES)
    write_run(root, "liec-lr", {"algorithm": "liec", "up": "sign", "down": "sign", "seed": 0,
                                "lr": 0.2}, [0.30, 0.70, 0.80], (40, 40), summary_extra=TIMES)
    # MEM-SGD asked for a sign downlink; it sends the mean dense all the same
    write_run(root, "memsgd", {"algorithm": "memsgd", "up": "topk:ratio=0.01",
                               "down": "topk:ratio=0.01"},
              [0.2, 0.3, 0.4], (20, 1000), summary_extra=TIMES)
    write_run(root, "dgc", {"algorithm": "dgc", "up": "dgc:ratio=0.001,sample_ratio=0.01",
                            "down": "none", "pattern": "allgather"},
              [0.3, 0.5, 0.6], (30, 3), summary_extra=TIMES)
    runs, skipped = collect.load_runs([root])
    assert not skipped
    return runs


EXPECTED_LABELS = ["DGC 0.1 %", "LIEC-SGD (sign ↑↓), lr 0.05", "LIEC-SGD (sign ↑↓), lr 0.2",
                   "MEM-SGD (top-k 1 % ↑)", "P-SGD, 2 seeds"]


@pytest.fixture
def drawn(tmp_path: Path):
    figures = dict(plots.figures(plt, _runs(tmp_path / "runs"), title="digits, 2 ranks"))
    yield figures
    for fig in figures.values():
        plt.close(fig)


def _inside(box, outer, slack=1.0) -> bool:
    return (box.x0 >= outer.x0 - slack and box.y0 >= outer.y0 - slack
            and box.x1 <= outer.x1 + slack and box.y1 <= outer.y1 + slack)


def test_every_label_and_legend_entry_lies_inside_the_figure(drawn):
    assert set(drawn) == {"accuracy", "loss-vs-bits", "step-time", "bytes"}
    for stem, fig in drawn.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        # each axes with its drawn tick labels, axis labels, title and annotations
        for ax in fig.axes:
            box = ax.get_tightbbox(renderer)
            assert _inside(box, fig.bbox), f"{stem}: axes {ax.get_xlabel()!r} at {box}"
        (legend,) = fig.legends
        texts = [*legend.get_texts(), *(t for ax in fig.axes for t in ax.texts),
                 *(ax.xaxis.label for ax in fig.axes), *(ax.yaxis.label for ax in fig.axes)]
        if fig._suptitle is not None:
            texts.append(fig._suptitle)
        for text in (t for t in texts if t.get_text()):
            box = text.get_window_extent(renderer)
            assert _inside(box, fig.bbox), f"{stem}: {text.get_text()!r} at {box}"
        legend_box = legend.get_window_extent(renderer)
        assert _inside(legend_box, fig.bbox), stem
        for ax in fig.axes:   # below the axes, not over the data
            assert not legend_box.overlaps(ax.get_window_extent(renderer)), stem


def test_legends_name_the_methods_from_their_metadata(drawn):
    for stem in ("accuracy", "loss-vs-bits"):
        labels = [t.get_text() for t in drawn[stem].legends[0].get_texts()]
        assert labels == EXPECTED_LABELS, stem
    bars = [t.get_text() for t in drawn["bytes"].axes[0].get_yticklabels()]
    assert bars == EXPECTED_LABELS
    assert [t.get_text() for t in drawn["step-time"].legends[0].get_texts()] == [
        "compute", "compress", "wire and wait", "other (data, evaluation)"]


def test_communication_axes_are_logarithmic(drawn):
    epoch_ax, time_ax, bits_ax = drawn["accuracy"].axes
    assert (epoch_ax.get_xscale(), time_ax.get_xscale(), bits_ax.get_xscale()) == (
        "linear", "linear", "log")
    loss_ax = drawn["loss-vs-bits"].axes[0]
    assert (loss_ax.get_xscale(), loss_ax.get_yscale()) == ("log", "log")
    assert drawn["bytes"].axes[0].get_xscale() == "log"


def test_seeds_are_averaged_with_a_band(drawn):
    epoch_ax, _, bits_ax = drawn["accuracy"].axes
    psgd = next(line for line in epoch_ax.get_lines() if line.get_label() == "P-SGD, 2 seeds")
    assert list(psgd.get_ydata()) == pytest.approx([55.0, 82.0, 91.0])   # (50+60)/2, ...
    assert list(psgd.get_xdata()) == [1, 2, 3]
    # one band: only P-SGD has two seeds; it spans mean ± sd (sd of two values: half the gap)
    bands = [c for c in epoch_ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(50.0) and max(ys) == pytest.approx(92.0)
    bits = next(line for line in bits_ax.get_lines() if line.get_label() == "P-SGD, 2 seeds")
    assert list(bits.get_xdata()) == pytest.approx([8 * 2000 * e for e in (1, 2, 3)])


def test_bars_hold_the_runs_numbers(drawn):
    ax = drawn["step-time"].axes[0]
    parts = [patch.get_width() for patch in ax.patches]
    n = len(EXPECTED_LABELS)
    compute, compress, comm, rest = (parts[i * n:(i + 1) * n] for i in range(4))
    assert compute == pytest.approx([1000 * 0.3 / 30] * n)
    assert comm == pytest.approx([1000 * 0.9 / 30] * n)
    # the rest of the wall time: LIEC's first run took 1.5 s, the others 3 s
    liec = EXPECTED_LABELS.index("LIEC-SGD (sign ↑↓), lr 0.05")
    assert rest[liec] == pytest.approx(1000 * (1.5 - 0.3 - 0.15 - 0.9) / 30)

    ax = drawn["bytes"].axes[0]
    widths = [patch.get_width() for patch in ax.patches]
    up, down = widths[:n], widths[n:]
    memsgd = EXPECTED_LABELS.index("MEM-SGD (top-k 1 % ↑)")
    assert (up[memsgd], down[memsgd]) == pytest.approx((3 * 20 / 30, 3 * 1000 / 30))


def test_gradient_norm_against_bits_when_the_runs_have_it(tmp_path: Path):
    run = write_run(tmp_path / "runs", "ef21", {"algorithm": "ef21", "up": "topk", "down": "topk"},
                    [0.2, 0.3], (10, 10))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for number, record in enumerate(lines, start=1):
        record["grad_norm_sq"] = 1.0 / number
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    runs, _ = collect.load_runs([tmp_path / "runs"])
    fig = plots.loss_figure(plt, plots.series_of(runs), "")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "‖∇f(x)‖²"
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([1.0, 1 / 3])   # step records
    plt.close(fig)


def test_runs_on_one_rank_send_nothing_and_say_so(tmp_path: Path):
    """One process sends no bytes: no point on a log axis (and no warning), 0 B at the bars."""
    import warnings
    for seed in (0, 1):
        write_run(tmp_path / "runs", f"single-{seed}", {"algorithm": "liec", "up": "sign",
                                                        "down": "sign", "seed": seed,
                                                        "world_size": 1},
                  [0.5, 0.6], (0, 0), summary_extra=TIMES)
    runs, _ = collect.load_runs([tmp_path / "runs"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = dict(plots.figures(plt, runs))
        for fig in figures.values():
            fig.canvas.draw()
    assert not drawn_lines(figures["accuracy"].axes[2])
    assert [t.get_text() for t in figures["bytes"].axes[0].texts] == ["0 B", "0 B"]
    assert drawn_lines(figures["accuracy"].axes[0])   # accuracy against epochs is still there
    for fig in figures.values():
        plt.close(fig)


def drawn_lines(ax):
    return [line for line in ax.get_lines() if len(line.get_xdata())]
