"""Runs that go wrong: a diverging run and a dead rank end every rank with a non-zero exit and a
message, never a hang and never a silently wrong result."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import multirank
from test_train_ranks import HVDCOMP, _train


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["psgd", "liec"])
def test_a_diverging_run_stops_every_rank_with_one_line(algorithm, tmp_path):
    done = _train(tmp_path / "nan", "--algorithm", algorithm, "--lr", "1e12", timeout=180)
    assert done.returncode != 0
    errors = [line for line in done.stdout.splitlines() if line.startswith("Error: ")]
    assert errors and all("training diverged; lower --lr" in line for line in errors), done.stdout
    assert "Traceback" not in done.stdout
    assert not (tmp_path / "nan" / "summary.json").exists()   # never reported as completed


def _rank_pids(out: Path):
    """PIDs of the `hvdcomp train` processes of this run, by their Open MPI rank."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline and any(b"hvdcomp" in part for part in cmdline[:2]):
            for item in environ:
                if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                    pids[int(item.split(b"=")[1])] = int(entry.name)
    return pids


@contextlib.contextmanager
def training_job(out: Path, *extra):
    """2 ranks training for a long time; yields ``(launcher process, {rank: pid})`` once three
    records are logged. The launcher's process group is killed on the way out if it still runs."""
    multirank.require("mpi")
    argv = [str(HVDCOMP), "train", "--out", str(out), "--quiet", "--epochs", "200",
            "--log-every", "1", *map(str, extra)]
    proc = subprocess.Popen(multirank.launch_command(2, "mpi", argv), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=multirank.launcher_env(),
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        metrics_file = out / "metrics.jsonl"
        while time.time() < deadline and not (metrics_file.exists()
                                              and metrics_file.read_text().count("\n") >= 3):
            time.sleep(0.5)
        pids = _rank_pids(out)
        assert 1 in pids, f"rank 1 not found; ranks seen: {pids}"
        yield proc, pids
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.mpi
def test_a_dead_rank_ends_the_job_instead_of_hanging(tmp_path):
    out = tmp_path / "dead"
    with training_job(out) as (proc, pids):
        os.kill(pids[1], signal.SIGKILL)           # rank 1 dies mid-training
        output, _ = proc.communicate(timeout=120)  # the job must end on its own, not hang
    assert proc.returncode != 0
    assert ("signal 9" in output or "exited on signal" in output
            or "killed" in output.lower()), output
    assert not (out / "summary.json").exists()
