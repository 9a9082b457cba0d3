"""``hvdcomp train`` on one process: configuration, launcher detection, schedules, run directories,
checkpoints, bad input (exit code 2, one line, nothing trained) and a complete N = 1 run."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hvdcomp.train import checkpoint as ckpt
from hvdcomp.train.config import (ConfigError, TrainConfig, detect_launcher, parse_checkpoint_every,
                                  parse_key_values, resume_mismatch)
from hvdcomp.train.loop import learning_rate
from hvdcomp.train.results import (RunDirectory, compression_ratio, psgd_bytes_per_step,
                                   read_metrics)

HVDCOMP = Path(sys.executable).parent / "hvdcomp"


def _hvdcomp(*args, cwd=None, timeout=300):
    """Run the installed ``hvdcomp`` script as a single process (no launcher variables)."""
    if not HVDCOMP.exists():
        pytest.skip(f"{HVDCOMP} missing: install the project (scripts/setup.sh)")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "SLURM_", "HOROVOD_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([str(HVDCOMP), "train", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"hvdcomp train {' '.join(map(str, args))} ran past {timeout}s")
    return proc.returncode, out, err


def _horovod():
    try:
        import horovod.torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Horovod does not import: {exc}")


# --- configuration --------------------------------------------------------------------------------
def test_defaults_resolve_compressor_and_momentum_from_the_algorithm():
    psgd = TrainConfig(algorithm="psgd").resolved()
    assert (psgd.up, psgd.down, psgd.momentum) == ("none", "none", 0.9)
    liec = TrainConfig().resolved()
    assert (liec.model, liec.dataset, liec.algorithm) == ("mlp", "digits", "liec")
    assert (liec.up, liec.down) == ("sign", "sign")
    dgc = TrainConfig(algorithm="dgc", up="topk:ratio=0.01", down="none").resolved()
    assert dgc.momentum == 0.0  # DGC's momentum correction carries the momentum
    assert dgc.up.startswith("topk") and dgc.down == "none"


@pytest.mark.parametrize("kwargs,message", [
    ({"algorithm": "adam"}, "unknown algorithm 'adam'"),
    ({"algorithm": "monna", "up": "sign"}, "exchanges whole models, uncompressed"),
    ({"up": "topk:ratio=2"}, "ratio"),
    ({"up": "zip"}, "unknown compressor 'zip'"),
    ({"epochs": 0}, "--epochs must be >= 1"),
    ({"schedule": "linear"}, "unknown schedule"),
    ({"non_iid_alpha": 0.0}, "Dirichlet alpha"),
    ({"checkpoint_every": "3 weeks"}, "--checkpoint-every"),
])
def test_bad_configuration_raises_config_error_naming_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs).resolved()


def test_checkpoint_every_units():
    assert parse_checkpoint_every("3") == (3, "epoch")
    assert parse_checkpoint_every("2epochs") == (2, "epoch")
    assert parse_checkpoint_every("100steps") == (100, "step")
    with pytest.raises(ConfigError):
        parse_checkpoint_every("0")


def test_algorithm_options_parse_numbers_and_lists():
    assert parse_key_values(["eta=0.5", "smoothness=[1, 2.5]", "mode=fast"]) == \
        {"eta": 0.5, "smoothness": [1, 2.5], "mode": "fast"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_key_values(["eta"])


def test_resume_compares_only_options_that_change_the_trajectory():
    saved = TrainConfig().resolved().to_dict()
    assert resume_mismatch(saved, {**saved, "out": "elsewhere", "log_every": 3}) == []
    assert resume_mismatch(saved, {**saved, "lr": 1.0, "seed": 7}) == ["lr", "seed"]


# --- launcher detection ---------------------------------------------------------------------------
def test_launcher_detection_from_the_environment():
    assert detect_launcher({})["name"] == "single"
    mpirun = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
              "OMPI_MCA_orte_hnp_uri": "x"}
    assert (detect_launcher(mpirun)["name"], detect_launcher(mpirun)["rank"],
            detect_launcher(mpirun)["world_size"]) == ("mpirun", 2, 4)
    # mpirun inside a Slurm allocation is still mpirun
    assert detect_launcher({**mpirun, "SLURM_STEP_ID": "0", "SLURM_PROCID": "0",
                            "SLURM_JOB_ID": "7"})["name"] == "mpirun"
    srun_pmix = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5", "SLURM_STEP_ID": "0",
                 "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "12"}
    found = detect_launcher(srun_pmix)
    assert (found["name"], found["rank"], found["world_size"], found["slurm_job_id"]) == \
        ("srun", 5, 8, "12")
    assert detect_launcher({"SLURM_STEP_ID": "1", "SLURM_PROCID": "3",
                            "SLURM_NTASKS": "4"})["rank"] == 3
    gloo = {"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_GLOO_RENDEZVOUS_ADDR": "h"}
    assert (detect_launcher(gloo)["name"], detect_launcher(gloo)["rank"]) == ("horovodrun", 1)


# --- learning-rate schedules ----------------------------------------------------------------------
def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(lr=0.4, schedule="cosine", warmup_epochs=1).resolved()
    spe, total = 10, 50
    assert learning_rate(cfg, 0, total, spe) == pytest.approx(0.04)
    assert learning_rate(cfg, 9, total, spe) == pytest.approx(0.4)
    assert learning_rate(cfg, 10, total, spe) == pytest.approx(0.4)
    assert learning_rate(cfg, 30, total, spe) == pytest.approx(
        0.4 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert learning_rate(cfg, 49, total, spe) == pytest.approx(
        0.4 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))


def test_step_schedule_decays_tenfold_at_each_milestone():
    cfg = TrainConfig(lr=0.1, schedule="step", milestones=(0.5, 0.75)).resolved()
    lrs = [learning_rate(cfg, s, 100, 10) for s in (0, 49, 50, 74, 75, 99)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    flat = TrainConfig(lr=0.3, schedule="constant").resolved()
    assert learning_rate(flat, 77, 100, 10) == 0.3


# --- results --------------------------------------------------------------------------------------
def test_compression_ratio_is_one_for_psgds_own_traffic():
    d_bytes, n, steps = 4 * 1000, 4, 7
    # ring allreduce: reduce-scatter + allgather
    psgd_up = psgd_down = steps * (n - 1) / n * d_bytes
    assert compression_ratio(d_bytes, n, steps, psgd_up, psgd_down) == pytest.approx(1.0)
    # 1 bit per coordinate each way (sign) instead of 32: 32 times fewer bytes
    assert compression_ratio(d_bytes, n, steps, psgd_up / 32, psgd_down / 32) == pytest.approx(32)
    assert compression_ratio(d_bytes, 1, steps, 0, 0) is None
    assert psgd_bytes_per_step(d_bytes, 2) == d_bytes


def test_metrics_are_on_disk_after_each_record_and_cut_back_on_resume(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.start({"a": 1}, {"b": 2}, resume_step=None)
    for step in (10, 20, 30):
        run.log({"event": "step", "step": step})
        # readable while the writer is still open: flushed per line
        assert read_metrics(run.metrics_path)[-1]["step"] == step
    run.close()
    with open(run.metrics_path, "a") as f:
        f.write('{"event": "step", "st')  # a line cut short by a crash
    assert [r["step"] for r in read_metrics(run.metrics_path)] == [10, 20, 30]
    resumed = RunDirectory(tmp_path / "run")
    resumed.start({"a": 1}, {"b": 2}, resume_step=20)
    resumed.log({"event": "step", "step": 30})
    resumed.finish({"status": "completed"})
    assert [r["step"] for r in read_metrics(run.metrics_path)] == [10, 20, 30]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"a": 1}


def test_checkpoints_are_atomic_linked_and_pruned(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        path = ckpt.save_checkpoint(folder,
                                    {"step": step, "ranks": [{"w": torch.full((3,), step)}]},
                                    keep=2)
        assert path.name == f"ckpt-{step}.pt"
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["ckpt-10.pt", "ckpt-15.pt"]
    assert ckpt.latest_checkpoint(folder).name == "ckpt-15.pt"
    state = ckpt.load_checkpoint(folder / "latest.pt")
    assert state["step"] == 15 and torch.equal(state["ranks"][0]["w"], torch.full((3,), 15))
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    (folder / "junk.pt").write_bytes(b"nope")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(folder / "junk.pt")


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    first = torch.rand(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


# --- the command on one process -------------------------------------------------------------------
def _bad_input_cases(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "metrics.jsonl").write_text("")
    return [
        (["--model", "vgg99"], "unknown model 'vgg99'"),
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--algorithm", "adamw"], "unknown algorithm 'adamw'"),
        (["--compressor", "zip"], "unknown compressor 'zip'"),
        (["--compressor", "topk:ratio=1.5"], "ratio"),
        (["--dataset", "cifar10"], "needs --data-dir"),
        (["--dataset", "cifar10", "--data-dir", tmp_path / "no-cifar"], "data_batch_1"),
        (["--out", a_file / "run"], "cannot write to output directory"),
        (["--out", finished], "already holds a run"),
        (["--out", tmp_path / "fresh", "--resume"], "no checkpoint"),
        (["--epochs", "many"], "'many' is not a valid integer"),
        (["--algorithm", "monna", "--algorithm-option", "f=1"], "n > 2f"),
        (["--algorithm", "monna", "--algorithm-option", "attack=sign_flip"], "needs f"),
        (["--model", "cnn", "--dataset", "synthetic"], "needs images"),
        (["--pattern", "allreduce", "--compressor", "sign"], "pattern 'allreduce' needs a linear"),
        (["--algorithm", "memsgd", "--down", "sign"], "sends its downlink dense"),
    ]


def test_bad_input_exits_2_with_one_line_before_training(tmp_path, monkeypatch):
    # In-process through the installed Click group (what `hvdcomp` runs), fast enough for every
    # case; the next test runs the real script for one of them.
    from click.testing import CliRunner
    from hvdcomp.cli.main import cli
    for name in [k for k in os.environ if k.startswith(("OMPI_COMM_WORLD", "SLURM_", "HOROVOD_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    for args, message in _bad_input_cases(tmp_path):
        out_dir = tmp_path / "out"
        full = args if "--out" in args else [*args, "--out", out_dir]
        result = CliRunner().invoke(cli, ["train", *map(str, full)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], \
            (args, lines)
        assert not (out_dir / "metrics.jsonl").exists()
        assert not list(tmp_path.rglob("summary.json"))
        assert not list(tmp_path.rglob("*.pt"))


def test_bad_input_through_the_installed_script(tmp_path):
    code, stdout, stderr = _hvdcomp("--compressor", "topk:ratio=0", "--out", tmp_path / "out")
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "ratio" in lines[0], (stdout, stderr)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_single_process_run_writes_the_run_directory(tmp_path):
    _horovod()
    out = tmp_path / "run"
    code, stdout, stderr = _hvdcomp("--algorithm", "psgd", "--epochs", "4", "--log-every", "20",
                                    "--out", out, "--quiet")
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["launcher"], config["algorithm"]) == (1, "single", "psgd")
    env = json.loads((out / "env.json").read_text())
    assert env["world_size"] == 1 and env["launcher"]["name"] == "single" and "torch" in env
    records = read_metrics(out / "metrics.jsonl")
    epochs = [r for r in records if r["event"] == "epoch"]
    steps = [r for r in records if r["event"] == "step"]
    assert len(epochs) == 4 and steps
    for record in records:
        for key in ("step", "epoch", "wall_time", "loss", "bytes_up", "bytes_down",
                    "time_compute", "time_compress", "time_comm", "samples"):
            assert key in record, key
    for record in epochs:
        assert {"test_accuracy", "test_loss", "train_accuracy"} <= set(record)
    assert [r["step"] for r in steps] == sorted(r["step"] for r in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final_accuracy"] == epochs[-1]["test_accuracy"]
    assert summary["best_accuracy"] == max(r["test_accuracy"] for r in epochs)
    assert summary["steps"] == epochs[-1]["step"] == 4 * (1438 // 32)
    assert summary["bytes_up"] == summary["bytes_down"] == 0  # one rank sends nothing
    # An MLP on digits: well above the 10% of chance after 4 epochs.
    assert summary["final_accuracy"] > 0.85
    assert "final test accuracy" in stdout  # the summary table


def test_a_live_run_locks_its_folder_and_stale_temporaries_are_removed(tmp_path):
    _horovod()
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    stale = [out / "checkpoints" / ".ckpt-40.pt.0badf00d.tmp", out / ".summary.json.1234abcd.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    first = subprocess.Popen([str(HVDCOMP), "train", "--algorithm", "psgd", "--epochs", "10000",
                              "--out", str(out), "--quiet"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ,
                                                                     "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        assert (out / "metrics.jsonl").exists(), first.communicate(timeout=5)
        assert not any(path.exists() for path in stale)   # the live run cleaned up at start
        assert first.poll() is None
        for extra in (["--overwrite"], ["--resume"]):
            code, stdout, stderr = _hvdcomp("--out", out, *extra)
            lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
            assert code == 2 and len(lines) == 1, (extra, stdout, stderr)
            assert "in use by a live run" in lines[0] and f"PID {first.pid}" in lines[0], lines
    finally:
        first.terminate()
        first.wait(timeout=60)
    # the lock dies with its process: the folder is free again
    code, stdout, stderr = _hvdcomp("--algorithm", "psgd", "--steps", "3", "--out", out,
                                    "--overwrite", "--quiet")
    assert code == 0, stderr


def _corrupt_cifar(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"\x00not a pickle")
    return root


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "5000"], "do not fill one batch of 5000 per rank; lower --batch-size"),
    (["--dataset", "cifar10", "--data-dir", "CORRUPT", "--model", "logreg"],
     "not a CIFAR python pickle"),
])
def test_problems_found_while_loading_data_are_one_line_too(args, message, tmp_path):
    _horovod()
    args = [str(_corrupt_cifar(tmp_path / "cifar")) if a == "CORRUPT" else a for a in args]
    code, stdout, stderr = _hvdcomp(*args, "--out", tmp_path / "out", "--quiet")
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (stdout, stderr)
    assert message in lines[0]


def test_debug_shows_the_traceback(tmp_path):
    for switch in (["--debug"], []):
        env = {**os.environ, "HVDCOMP_DEBUG": "1"} if not switch else None
        proc = subprocess.run([str(HVDCOMP), *switch, "train", "--compressor", "zip", "--out",
                               str(tmp_path / "out")], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr
        assert "unknown compressor 'zip'" in proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 300 kB tmpfs (root only): room for the run's logs, not for its first checkpoint."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_training_is_one_line_and_exit_1(small_disk):
    _horovod()
    out = small_disk / "run"
    code, stdout, stderr = _hvdcomp("--algorithm", "liec", "--steps", "20", "--checkpoint-every",
                                    "10steps", "--quiet", "--out", out)
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert code == 1, (stdout, stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: No space left on device: "), lines
    assert "/checkpoints/ckpt-" in lines[0]
    assert not (out / "summary.json").exists()
    assert not list((out / "checkpoints").glob(".*.tmp"))   # the failed write cleaned up
