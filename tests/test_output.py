"""What ``hvdcomp train`` prints and writes for tools: labels that say what travels, a summary
without colour codes off a terminal, plain progress lines in logs, Horovod's own lines kept off
the live bar, and TensorBoard events (issue 17)."""
from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import pytest

import multirank
from hvdcomp.labels import compressor_label, directions, method_name
from hvdcomp.train.progress import ProgressReporter
from hvdcomp.train.results import print_summary, tensorboard_scalars

HVDCOMP = Path(sys.executable).parent / "hvdcomp"
ANSI = re.compile(r"\x1b\[")


# --- labels ------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, name, travels", [
    ({"algorithm": "liec", "up": "sign", "down": "sign"},
     "LIEC-SGD (sign ↑↓)", "up sign, down sign"),
    # MEM-SGD and EF21 send the server's mean dense whatever `down` asked for
    ({"algorithm": "memsgd", "up": "sign", "down": "sign"},
     "MEM-SGD (sign ↑)", "up sign, down dense 32-bit"),
    ({"algorithm": "ef21", "up": "topk:ratio=0.01", "down": "topk:ratio=0.01"},
     "EF21 (top-k 1 % ↑)", "up top-k 1 %, down dense 32-bit"),
    ({"algorithm": "ef21bc", "up": "topk:ratio=0.01", "down": "topk:ratio=0.01"},
     "EF21-BC (top-k 1 % ↑↓)", "up top-k 1 %, down top-k 1 %"),
    ({"algorithm": "dgc", "up": "dgc:ratio=0.001,sample_ratio=0.01", "down": "none",
      "pattern": "allgather"}, "DGC 0.1 %", "up DGC 0.1 %, allgathered"),
    ({"algorithm": "psgd", "up": "none", "down": "none"}, "P-SGD", "up dense 32-bit, down dense"),
    ({"algorithm": "doublesqueeze", "up": "sign", "down": "topk:ratio=0.05"},
     "DoubleSqueeze (sign ↑, top-k 5 % ↓)", "up sign, down top-k 5 %"),
    ({"algorithm": "monna", "up": "none", "down": "none",
      "algorithm_options": {"f": 1, "attack": "sign_flip"}},
     "MoNNA (NNA, sign_flip attack)", "up dense 32-bit, whole models exchanged"),
    ({"algorithm": "monna", "up": "none", "down": "none",
      "algorithm_options": {"aggregator": "mean"}}, "MoNNA (mean)", "up dense 32-bit, whole"),
])
def test_labels_say_what_travels(config, name, travels):
    assert method_name(config) == name
    assert directions(config).startswith(travels)


def test_compressor_labels_fill_in_defaults():
    assert compressor_label("topk") == "top-k 1 %"           # the default ratio, 0.01
    assert compressor_label("randomk:ratio=0.25") == "rand-k 25 %"
    assert compressor_label("powersgd:rank=2") == "PowerSGD rank 2"
    assert compressor_label("none") == compressor_label(None) == "dense 32-bit"
    assert compressor_label("fancy:thing=1") == "fancy"      # unknown (a newer run): its name


# --- the summary --------------------------------------------------------------------------------
CONFIG = {"algorithm": "memsgd", "up": "topk:ratio=0.01", "down": "topk:ratio=0.01",
          "model": "mlp", "dataset": "digits", "world_size": 2, "launcher": "srun", "lr": 0.05,
          "momentum": 0.0, "nesterov": False, "weight_decay": 5e-4, "algorithm_options": {}}
SUMMARY = {"final_accuracy": 0.9, "best_accuracy": 0.91, "steps": 10, "epochs": 1,
           "wall_time": 1.0, "samples_per_s": 100, "time_compute": 0.5, "time_compress": 0.1,
           "time_comm": 0.2, "bytes_up": 1000, "bytes_down": 34000, "compression_ratio": 1.9,
           "run_dir": "/scratch/" + "a-long-sweep-folder-name/" * 8 + "memsgd-topk-n2-s0"}


def test_summary_in_a_file_is_plain_text_with_the_whole_path(monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    out = io.StringIO()
    print_summary(SUMMARY, CONFIG, file=out)
    text = out.getvalue()
    assert not ANSI.search(text) and "…" not in text and "┃" not in text
    assert SUMMARY["run_dir"] in text
    assert "MEM-SGD (top-k 1 % ↑)" in text and "up top-k 1 %, down dense 32-bit" in text
    assert "down topk" not in text


def test_summary_in_a_legacy_encoding_does_not_fail_the_run():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="latin-1")
    print_summary(SUMMARY, CONFIG, file=stream)
    text = raw.getvalue().decode("latin-1")
    assert "MEM-SGD (top-k 1 % ?)" in text and SUMMARY["run_dir"] in text


# --- progress ----------------------------------------------------------------------------------
def test_plain_progress_lines_every_tenth_and_per_epoch(capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    bar = ProgressReporter(enabled=True, total=40, done=0, steps_per_epoch=20)
    for step in range(1, 41):
        bar.advance(loss=1.0 / step)
        if step % 20 == 0:
            bar.epoch_line({"epoch": step / 20, "step": step, "loss": 0.5, "test_accuracy": 0.8,
                            "wall_time": 1.0})
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == [f"{n}/40" for n in range(4, 40, 4)]
    assert [line for line in lines if line.startswith("epoch ")] == [
        "epoch 1.00  step 20  loss 0.5000  test acc 80.00%  1.0s",
        "epoch 2.00  step 40  loss 0.5000  test acc 80.00%  1.0s"]
    assert not ANSI.search("\n".join(lines))


def test_quiet_and_other_ranks_print_nothing(capsys):
    bar = ProgressReporter(enabled=False, total=10, done=0)
    for _ in range(10):
        bar.advance(1.0)
    bar.epoch_line({"epoch": 1.0, "step": 10, "loss": 1.0, "test_accuracy": 0.5, "wall_time": 1})
    bar.close()
    assert capsys.readouterr().out == ""


def test_lines_written_to_descriptor_2_land_above_the_live_bar(capfd, monkeypatch):
    """Horovod's C++ core writes to fd 2 directly; while the bar is live those lines are
    printed as whole lines of their own, never inside the bar's line."""
    monkeypatch.setenv("FORCE_COLOR", "1")   # draw the bar although pytest captures the streams
    bar = ProgressReporter(enabled=True, total=4, done=0)
    assert bar.progress is not None and bar.fd2 is not None
    bar.advance(0.5)
    os.write(2, b"[1]<stderr>:[2026-11-29 19:00:00.000] [WARNING] horovod stall warning\n")
    bar.advance(0.4)
    bar.close()
    os.write(2, b"after the bar\n")
    err = capfd.readouterr().err
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err).replace("\r", "\n")
    assert ("[1]<stderr>:[2026-11-29 19:00:00.000] [WARNING] horovod stall warning"
            in plain.splitlines()), plain
    assert "after the bar" in plain.splitlines()


# --- TensorBoard ---------------------------------------------------------------------------------
def test_tensorboard_scalars_of_step_and_epoch_records():
    step = {"event": "step", "step": 10, "epoch": 0.5, "wall_time": 2.0, "samples": 640,
            "loss": 1.5, "lr": 0.05, "bytes_up": 100.0, "bytes_down": 400.0, "time_compute": 0.2,
            "time_compress": 0.1, "time_comm": 0.3}
    assert tensorboard_scalars(step) == {
        "train/loss": 1.5, "train/lr": 0.05, "bytes/up": 100.0, "bytes/down": 400.0,
        "time/compute": 0.2, "time/compress": 0.1, "time/comm": 0.3, "time/wall": 2.0}
    epoch = {"event": "epoch", "step": 20, "epoch": 1.0, "loss": 1.2, "train_accuracy": 0.6,
             "test_accuracy": 0.7, "test_loss": 1.1, "bytes_up": 200.0}
    assert tensorboard_scalars(epoch) == {"epoch/train_loss": 1.2, "epoch/train_accuracy": 0.6,
                                          "epoch/test_accuracy": 0.7, "epoch/test_loss": 1.1}


def test_tensorboard_missing_is_one_line_and_exit_2(tmp_path):
    """A `tensorboard` package that fails to import stands for one that is not installed."""
    import subprocess
    shadow = tmp_path / "shadow" / "tensorboard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'tensorboard'\")\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "SLURM_", "HOROVOD_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "hvdcomp.cli.main", "train", "--steps", "2",
                           "--tensorboard", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--tensorboard needs the tensorboard package" in done.stderr
    assert "pip install tensorboard" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_two_ranks_log_to_a_file_plainly_and_write_tensorboard_events(tmp_path):
    """Under mpirun with output to a file (a Slurm log): progress lines, no colour codes, the
    whole run-directory path, and the per-step scalars in RUN_DIR/tensorboard."""
    pytest.importorskip("tensorboard")
    multirank.require("mpi")
    out = tmp_path / ("a-run-directory-with-a-name-long-enough-to-be-cut-in-80-columns-" * 2)
    argv = [str(HVDCOMP), "train", "--algorithm", "memsgd", "--compressor", "sign",
            "--steps", "30", "--log-every", "5", "--tensorboard", "--out", str(out)]
    done = multirank.run_command(multirank.launch_command(2, "mpi", argv), timeout=300)
    assert done.returncode == 0, done.stdout
    assert not ANSI.search(done.stdout), done.stdout
    assert str(out) in done.stdout and "…" not in done.stdout
    assert "step 3/30 (10%)" in done.stdout and "epoch 1.36  step 30" in done.stdout
    assert "MEM-SGD (sign ↑)" in done.stdout and "up sign, down dense 32-bit" in done.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    for tag, key in (("train/loss", "loss"), ("bytes/up", "bytes_up"),
                     ("bytes/down", "bytes_down"), ("time/comm", "time_comm")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in steps], tag
    accuracy = [(e.step, e.value) for e in events.Scalars("epoch/test_accuracy")]
    assert accuracy == [(r["step"], pytest.approx(r["test_accuracy"], rel=1e-6))
                        for r in records if r["event"] == "epoch"]
