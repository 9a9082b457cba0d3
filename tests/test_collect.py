"""hvdcomp collect on run directories written here in the documented format (docs/design.md,
"Run directories"): expected values are computed from the fixture's numbers, not copied from
the code's output."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from hvdcomp import collect
from hvdcomp.cli.main import cli

REPO = Path(__file__).resolve().parent.parent
BASE = {"model": "mlp", "dataset": "digits", "epochs": 3, "batch_size": 32, "lr": 0.05,
        "seed": 0, "world_size": 2, "launcher": {"name": "srun", "slurm_job_id": "7"}}


def write_run(root: Path, name: str, config: dict, accuracies, bytes_per_epoch,
              seconds_per_epoch=1.0, summary_extra=None, complete=True) -> Path:
    """A run directory as `hvdcomp train` writes it: epoch records with cumulative counters."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**BASE, **config}))
    lines = []
    up = down = 0
    for epoch, accuracy in enumerate(accuracies, start=1):
        up += bytes_per_epoch[0]
        down += bytes_per_epoch[1]
        lines.append({"event": "step", "step": 10 * epoch, "epoch": epoch - 0.5,
                      "loss": 1.0 / epoch, "wall_time": seconds_per_epoch * (epoch - 0.5),
                      "bytes_up": up, "bytes_down": down})
        lines.append({"event": "epoch", "step": 10 * epoch, "epoch": epoch,
                      "wall_time": seconds_per_epoch * epoch, "test_accuracy": accuracy,
                      "test_loss": 1.0 - accuracy, "bytes_up": up, "bytes_down": down,
                      "samples": 320 * epoch})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if complete:
        summary = {"status": "completed", "final_accuracy": accuracies[-1],
                   "best_accuracy": max(accuracies),
                   "wall_time": seconds_per_epoch * len(accuracies),
                   "bytes_up": up, "bytes_down": down, "steps": 10 * len(accuracies),
                   "epochs": len(accuracies), "samples_per_s": 320 / seconds_per_epoch,
                   **(summary_extra or {})}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    return make_runs(tmp_path / "runs")


def make_runs(root: Path) -> Path:
    """Four completed runs, one still running, three corrupt."""
    write_run(root, "psgd", {"algorithm": "psgd", "up": "none", "down": "none"},
              [0.50, 0.80, 0.90], (1000, 1000))
    write_run(root, "liec-sign", {"algorithm": "liec", "up": "sign", "down": "sign"},
              [0.40, 0.85, 0.88], (40, 40), seconds_per_epoch=0.5)
    # No P-SGD run with seed 1: the ratio falls back to dense fp32 bytes from the model size.
    write_run(root, "nested/memsgd-seed1",
              {"algorithm": "memsgd", "up": "sign", "down": "none", "seed": 1},
              [0.30, 0.60, 0.70], (100, 400), summary_extra={"gradient_bytes_per_step": 4000})
    # ... or from a parameter count (fp32: 4 bytes each).
    write_run(root, "randomk-seed5",
              {"algorithm": "memsgd", "up": "randomk", "down": "none", "seed": 5},
              [0.1, 0.2, 0.3], (10, 10), summary_extra={"num_parameters": 500})
    # Neither a baseline nor a model size: no ratio.
    write_run(root, "ef21-seed2", {"algorithm": "ef21", "up": "topk", "down": "topk", "seed": 2},
              [0.2, 0.3, 0.4], (10, 10))
    # Running (no summary.json yet) and corrupt directories.
    write_run(root, "running", {"algorithm": "dgc", "up": "dgc", "down": "none"}, [0.1], (5, 5),
              complete=False)
    bad_config = root / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"algorithm": "psgd", ')
    bad_metrics = write_run(root, "bad-metrics",
                            {"algorithm": "liec", "up": "sign", "down": "sign", "seed": 3},
                            [0.1, 0.2], (1, 1))
    lines = (bad_metrics / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]  # a damaged line that is not the last one
    (bad_metrics / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    bad_summary = write_run(root, "bad-summary",
                            {"algorithm": "liec", "up": "sign", "down": "sign", "seed": 4},
                            [0.1], (1, 1))
    (bad_summary / "summary.json").write_text(json.dumps({"status": "completed",
                                                          "final_accuracy": 0.1}))
    return root


def test_load_runs_skips_partial_and_corrupt(runs_root: Path):
    runs, skipped = collect.load_runs([runs_root])
    assert sorted(r.path.name for r in runs) == ["ef21-seed2", "liec-sign", "memsgd-seed1", "psgd",
                                                 "randomk-seed5"]
    kinds = {s.path.name: s.kind for s in skipped}
    assert kinds == {"running": "partial", "bad-config": "corrupt", "bad-metrics": "corrupt",
                     "bad-summary": "corrupt"}
    reasons = {s.path.name: s.reason for s in skipped}
    assert "metrics.jsonl line 2" in reasons["bad-metrics"]
    assert "bytes_up" in reasons["bad-summary"]


def test_a_cut_last_metrics_line_is_dropped(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "epoch", "epoch": 1}\n{"event": "epo')
    assert collect.read_metrics(path) == [{"event": "epoch", "epoch": 1}]


def test_compare_values(runs_root: Path):
    runs, _ = collect.load_runs([runs_root])
    rows = {Path(r["run"]).name: r for r in collect.compare(runs, target=0.85)}

    psgd, liec = rows["psgd"], rows["liec-sign"]
    memsgd, ef21 = rows["memsgd-seed1"], rows["ef21-seed2"]
    assert (liec["final_accuracy"], liec["best_accuracy"]) == (0.88, 0.88)
    # liec reaches 0.85 at epoch 2 (0.5 s per epoch); psgd at epoch 3 (0.90 >= 0.85, 1 s per epoch).
    assert (liec["time_to_target"], liec["epochs_to_target"]) == (1.0, 2)
    assert (psgd["time_to_target"], psgd["epochs_to_target"]) == (3.0, 3)
    assert memsgd["time_to_target"] is None
    assert liec["bytes_up"] == 3 * 40 and liec["bytes_down"] == 3 * 40

    # Against the P-SGD run with the same settings: 3*(1000+1000) bytes vs 3*(40+40).
    assert liec["compression_ratio"] == pytest.approx(6000 / 240)
    assert liec["ratio_up"] == pytest.approx(3000 / 120)
    assert psgd["compression_ratio"] == pytest.approx(1.0)
    assert liec["baseline"].startswith("psgd run")
    # Fallback: dense fp32 P-SGD over a ring allreduce, 2 (N-1)/N * 4000 gradient bytes per step,
    # 30 steps, against 3*(100+400) bytes sent; from 500 parameters: 2 (N-1)/N * 4 * 500 per step.
    dense_total = 2 * (2 - 1) / 2 * 4000 * 30
    assert memsgd["compression_ratio"] == pytest.approx(dense_total / 1500)
    assert memsgd["baseline"] == "dense fp32 from model size"
    assert rows["randomk-seed5"]["compression_ratio"] == pytest.approx(
        2 * (2 - 1) / 2 * 4 * 500 * 30 / 60)
    assert ef21["compression_ratio"] is None and ef21["baseline"] is None
    assert liec["samples_per_s"] == pytest.approx(640)


def test_option_columns_are_those_that_vary(runs_root: Path):
    runs, _ = collect.load_runs([runs_root])
    columns = collect.option_columns(runs)
    assert {"algorithm", "up", "down", "seed"} <= set(columns)
    assert "model" not in columns and "launcher" not in columns


def test_sort_and_group(runs_root: Path):
    runs, _ = collect.load_runs([runs_root])
    rows = collect.compare(runs)
    by_accuracy = collect.sort_rows(rows, ["-final_accuracy"])
    assert [r["final_accuracy"] for r in by_accuracy] == [0.90, 0.88, 0.70, 0.4, 0.3]
    groups = collect.group_rows(rows, ["seed"])
    assert [g[0]["seed"] for g in groups] == [0, 1, 2, 5]
    assert sorted(Path(r["run"]).name for r in groups[0][1]) == ["liec-sign", "psgd"]


def test_cli_json_csv_markdown(runs_root: Path):
    runner = CliRunner()
    result = runner.invoke(cli, ["collect", str(runs_root), "--format", "json", "--target", "85"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["runs"]) == 5 and len(data["skipped"]) == 4
    liec = next(r for r in data["runs"] if r["run"].endswith("liec-sign"))
    assert liec["time_to_target"] == 1.0
    assert "skipped (corrupt)" in result.stderr and "bad-config" in result.stderr

    result = runner.invoke(cli, ["collect", str(runs_root), "--format", "csv",
                                 "--sort-by", "-best_accuracy"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [float(r["best_accuracy"]) for r in rows] == [0.90, 0.88, 0.70, 0.4, 0.3]
    assert float(rows[1]["compression_ratio"]) == pytest.approx(25.0)

    result = runner.invoke(cli, ["collect", str(runs_root), "--format", "markdown",
                                 "--group-by", "seed"])
    assert result.exit_code == 0, result.output
    assert "### seed = 0" in result.stdout and "### seed = 2" in result.stdout
    assert "| LIEC-SGD (sign ↑↓) | liec-sign |" in result.stdout
    assert "25.0x" in result.stdout and "88.00%" in result.stdout

    result = runner.invoke(cli, ["collect", str(runs_root)])  # rich table
    assert result.exit_code == 0, result.output
    assert "liec-sign" in result.stdout


def test_cli_bad_input(runs_root: Path, tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(cli, ["collect", str(runs_root), "--sort-by", "colour"])
    assert result.exit_code == 2 and "colour" in result.output
    result = runner.invoke(cli, ["collect", str(runs_root), "--target", "150"])
    assert result.exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(cli, ["collect", str(empty)])
    assert result.exit_code == 1 and "no completed runs" in result.output


def test_plots_are_written(runs_root: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figures"
    result = CliRunner().invoke(cli, ["collect", str(runs_root), "--format", "csv",
                                      "--plot", str(out),
                                      "--plot-format", "png", "--plot-format", "svg"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{stem}.{fmt}" for stem in ("accuracy", "loss-vs-bits", "step-time",
                                                        "bytes") for fmt in ("png", "svg"))
    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    svg = (out / "accuracy.svg").read_text()
    # one line per completed run: the legend names each method as its paper does
    for name in ("P-SGD", "LIEC-SGD (sign ↑↓)", "EF21 (top-k 1 % ↑)"):
        assert name in svg


def test_plots_grouped(runs_root: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    runs, _ = collect.load_runs([runs_root])
    written = collect.plot(runs, tmp_path / "g", group_by=["seed"], formats=("png", "pdf"))
    assert len(written) == 4 * 4 * 2  # four seeds, four figures each, two formats
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    assert (tmp_path / "g" / "accuracy_seed-0.pdf").read_bytes()[:4] == b"%PDF"


def test_cli_table_with_relative_and_absolute_run_paths(runs_root: Path, monkeypatch):
    # `hvdcomp collect runs/ /abs/other-run`: the run names are shortened below a common folder
    monkeypatch.chdir(runs_root.parent)
    relative = str(runs_root.relative_to(runs_root.parent) / "psgd")
    result = CliRunner().invoke(cli, ["collect", relative, str(runs_root / "liec-sign"),
                                      "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert "| psgd " in result.stdout and "| liec-sign " in result.stdout


# --- damaged runs never abort the table (issue 14) ----------------------------------------------
def completed_run(root: Path, name: str, seed: int) -> Path:
    return write_run(root, name, {"algorithm": "liec", "up": "sign", "down": "sign", "seed": seed},
                     [0.5, 0.6], (10, 10))


def test_binary_and_misshapen_files_are_skipped_and_named(tmp_path: Path):
    root = tmp_path / "runs"
    completed_run(root, "good", 0)
    binary_middle = completed_run(root, "binary-metrics", 1)
    lines = (binary_middle / "metrics.jsonl").read_bytes().split(b"\n")
    lines[1] = b"\xff\xfe\x00binary\x80"                     # not UTF-8, not the last line
    (binary_middle / "metrics.jsonl").write_bytes(b"\n".join(lines))
    binary_last = completed_run(root, "binary-last-line", 2)  # what a cut writer can leave
    with open(binary_last / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"event": "ep\xc3')
    folder_metrics = completed_run(root, "metrics-is-a-folder", 3)
    (folder_metrics / "metrics.jsonl").unlink()
    (folder_metrics / "metrics.jsonl").mkdir()
    binary_summary = completed_run(root, "binary-summary", 4)
    (binary_summary / "summary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    folder_config = root / "config-is-a-folder"
    (folder_config / "config.json").mkdir(parents=True)
    fifo_run = completed_run(root, "metrics-is-a-fifo", 5)
    (fifo_run / "metrics.jsonl").unlink()
    os.mkfifo(fifo_run / "metrics.jsonl")                     # reading it would block forever

    runs, skipped = collect.load_runs([root])
    assert sorted(r.path.name for r in runs) == ["binary-last-line", "good"]
    reasons = {s.path.name: (s.kind, s.reason) for s in skipped}
    assert reasons["binary-metrics"][0] == "corrupt" and "line 2" in reasons["binary-metrics"][1]
    assert reasons["metrics-is-a-folder"] == ("corrupt", "metrics.jsonl is a folder")
    assert reasons["metrics-is-a-fifo"] == ("corrupt", "metrics.jsonl is not a regular file")
    assert reasons["config-is-a-folder"] == ("corrupt", "config.json is a folder")
    assert "summary.json is not UTF-8" in reasons["binary-summary"][1]

    result = CliRunner().invoke(cli, ["collect", str(root), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert sorted(Path(row["run"]).name for row in csv.DictReader(io.StringIO(result.stdout))) == [
        "binary-last-line", "good"]
    for name in ("binary-metrics", "metrics-is-a-folder", "metrics-is-a-fifo", "config-is-a-folder",
                 "binary-summary"):
        assert f"skipped (corrupt): {root / name}:" in result.stderr
    assert "Traceback" not in result.output


NOBODY = 65534


def run_as_nobody(args, cwd: Path) -> subprocess.CompletedProcess:
    """hvdcomp as an unprivileged user (root reads every file, so permissions need another uid)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run hvdcomp as another user")
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           sys.executable, "-m", "hvdcomp.cli.main", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture
def shared_root():
    """A folder every user may enter (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="hvdcomp-collect-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_unreadable_files_and_folders_are_skipped(shared_root: Path):
    root = shared_root / "runs"
    completed_run(root, "good", 0)
    no_metrics = completed_run(root, "unreadable-metrics", 1)
    (no_metrics / "metrics.jsonl").chmod(0o000)
    no_summary = completed_run(root, "unreadable-summary", 2)
    (no_summary / "summary.json").chmod(0o000)
    completed_run(root, "locked/inner", 3)
    (root / "locked").chmod(0o700)                              # nobody cannot list it
    for folder, _, files in os.walk(root):
        if Path(folder) != root / "locked":
            os.chmod(folder, 0o755)
    done = run_as_nobody(["collect", str(root), "--format", "csv"], shared_root)
    assert done.returncode == 0, done.stderr
    assert "good" in done.stdout and "unreadable" not in done.stdout
    denied = "unreadable: Permission denied"
    assert f"skipped (corrupt): {no_metrics}: metrics.jsonl {denied}" in done.stderr
    assert f"skipped (corrupt): {no_summary}: summary.json {denied}" in done.stderr
    assert f"skipped (unreadable): {root / 'locked'}: folder {denied}" in done.stderr
    assert "Traceback" not in done.stderr


def test_unwritable_plot_folder_is_one_error_before_anything(runs_root: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(cli, ["collect", str(runs_root),
                                      "--plot", str(blocker / "figures")])
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"Error: --plot {blocker / 'figures'}: cannot write figures there")
    assert result.stdout == "" and "Traceback" not in result.output


def test_plot_folder_without_permission(shared_root: Path):
    pytest.importorskip("matplotlib")
    make_runs(shared_root / "runs")
    for folder, _, _ in os.walk(shared_root):
        os.chmod(folder, 0o755)                                  # readable, not writable
    done = run_as_nobody(["collect", str(shared_root / "runs"),
                          "--plot", str(shared_root / "runs")],
                         shared_root)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: --plot {shared_root / 'runs'}: cannot write figures there (Permission denied); "
        "choose another folder")
    assert done.stdout == ""


# --- a readable table, sort keys spelled as headers, curves as CSV (issue 17) --------------------
def test_table_shows_methods_and_only_the_settings_that_vary(tmp_path: Path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, f"psgd-s{seed}", {"algorithm": "psgd", "up": "none", "down": "none",
                                          "momentum": 0.9, "seed": seed}, [0.5, 0.9], (100, 100))
        write_run(root, f"memsgd-s{seed}", {"algorithm": "memsgd", "up": "topk", "down": "topk",
                                            "momentum": 0.0, "seed": seed}, [0.4, 0.8], (10, 100))
    result = CliRunner().invoke(cli, ["collect", str(root), "--format", "markdown"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    # seed varies within a method: a column; momentum is fixed per method: said once per method
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "run", "seed", "final acc", "best acc", "wall time", "bytes up", "bytes down",
        "vs psgd", "samples/s"]
    assert "same in every run: model=mlp, dataset=digits, epochs=3, batch_size=32, lr=0.05, " \
           "world_size=2  " in lines
    assert "MEM-SGD (top-k 1 % ↑): momentum=0  " in lines and "P-SGD: momentum=0.9  " in lines
    # MEM-SGD's downlink is dense: its name says so, whatever config.json's "down" holds
    assert sum(line.startswith("| MEM-SGD (top-k 1 % ↑) | memsgd-s") for line in lines) == 2
    assert "topk" not in result.stdout.replace("top-k", "")


@pytest.mark.parametrize("key", ["final_acc", "final acc", "final-acc", "final_accuracy"])
def test_sort_by_takes_the_header_as_written(runs_root: Path, key: str):
    result = CliRunner().invoke(cli, ["collect", str(runs_root), "--format", "csv",
                                      "--sort-by", f"-{key}"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [float(r["final_accuracy"]) for r in rows] == [0.90, 0.88, 0.70, 0.4, 0.3]


def test_sort_by_other_headers_and_a_bad_key(runs_root: Path):
    runner = CliRunner()
    result = runner.invoke(cli, ["collect", str(runs_root), "--format", "csv",
                                 "--sort-by", "-vs_psgd"])
    assert result.exit_code == 0, result.output
    ratios = [r["compression_ratio"] for r in csv.DictReader(io.StringIO(result.stdout))]
    # as in test_compare_values: randomk-seed5 (dense from 500 parameters) 2 (N-1)/N * 4 * 500
    # * 30 / 60, memsgd-seed1 4000 * 30 / 1500, liec 6000 / 240, psgd itself; ef21 none: last
    assert [float(r) for r in ratios[:4]] == pytest.approx([1000.0, 80.0, 25.0, 1.0])
    assert ratios[-1] == ""
    result = runner.invoke(cli, ["collect", str(runs_root), "--format", "csv",
                                 "--sort-by", "method"])
    methods = [r["method"] for r in csv.DictReader(io.StringIO(result.stdout))]
    assert methods == sorted(methods) and "LIEC-SGD (sign ↑↓)" in methods
    result = runner.invoke(cli, ["collect", str(runs_root), "--sort-by", "final_acuracy"])
    assert result.exit_code == 2
    assert "final_acc" in result.output and "vs_psgd" in result.output   # the choices, as headers


def test_curves_as_csv_and_json(runs_root: Path):
    runner = CliRunner()
    result = runner.invoke(cli, ["collect", str(runs_root), "--curves"])   # csv by default
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    # five completed runs, 3 epochs each, one step and one epoch record per epoch
    assert len(rows) == 5 * 3 * 2
    assert list(rows[0])[:6] == ["run", "method", "seed", "event", "step", "epoch"]
    liec = [r for r in rows if r["run"].endswith("liec-sign")]
    assert [r["event"] for r in liec] == ["step", "epoch"] * 3
    assert [float(r["test_accuracy"]) for r in liec if r["event"] == "epoch"] == [0.40, 0.85, 0.88]
    assert [float(r["bytes_up"]) for r in liec if r["event"] == "epoch"] == [40, 80, 120]
    assert {r["method"] for r in liec} == {"LIEC-SGD (sign ↑↓)"}

    result = runner.invoke(cli, ["collect", str(runs_root), "--curves", "--format", "json"])
    data = json.loads(result.stdout)
    assert len(data["curves"]) == 30 and len(data["skipped"]) == 4

    result = runner.invoke(cli, ["collect", str(runs_root), "--curves", "--format", "table"])
    assert result.exit_code == 2 and "--curves" in result.output and "csv or json" in result.output
    result = runner.invoke(cli, ["collect", str(runs_root), "--curves", "--sort-by", "seed"])
    assert result.exit_code == 2 and "--sort-by shapes the summary table" in result.output


def test_table_in_a_file_has_no_colour_codes(runs_root: Path):
    result = CliRunner().invoke(cli, ["collect", str(runs_root)], env={"FORCE_COLOR": None})
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.stdout and "…" not in result.stdout
    assert "LIEC-SGD (sign ↑↓)" in result.stdout and "final acc" in result.stdout
