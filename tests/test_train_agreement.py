"""Ranks that disagree fail fast and say why; a stopped rank ends the job; no error is hidden.

Each case starts 2 real ranks with mpirun's MPMD syntax (``mpirun -np 1 A : -np 1 B``), so rank 1
gets other options than rank 0, as a careless wrapper script would give it. Every case must end
with exit code 2 and one message, long before the stall guard could step in: the guard is set to
300 s here and the launcher is killed (failing the test) after 120 s, so a case that the
agreement check misses fails instead of passing by the guard.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import multirank
from test_train_failures import training_job
from test_train_ranks import HVDCOMP

QUICK = ["--quiet", "--steps", "4", "--log-every", "2", "--stall-timeout", "300"]


def _mpmd(out: Path, rank0_args, rank1_args, common=QUICK, timeout: float = 120):
    """Launch rank 0 and rank 1 of one job with different arguments."""
    multirank.require("mpi")
    if not HVDCOMP.exists():
        pytest.skip(f"{HVDCOMP} missing: install the project (scripts/setup.sh)")
    base = [str(HVDCOMP), "train", "--out", str(out), *common]
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none",
           "-np", "1", *base, *map(str, rank0_args), ":",
           "-np", "1", *base, *map(str, rank1_args)]
    return multirank.run_command(cmd, timeout)


def _errors(output: str):
    return [line for line in output.splitlines() if line.startswith("Error")]


@pytest.mark.mpi
@pytest.mark.parametrize("rank0, rank1, setting, values", [
    (["--batch-size", 32], ["--batch-size", 16], "batch_size", ("32", "16")),
    (["--epochs", 2], ["--epochs", 3], "epochs", ("2", "3")),
    (["--algorithm", "psgd"], ["--algorithm", "liec"], "algorithm", ("'psgd'", "'liec'")),
    (["--seed", 0], ["--seed", 1], "seed", ("0", "1")),
    (["--lr", 0.05], ["--lr", 0.1], "lr", ("0.05", "0.1")),
    (["--model", "mlp"], ["--model", "logreg"], "model", ("'mlp'", "'logreg'")),
])
def test_ranks_started_with_different_settings_stop_with_one_message(rank0, rank1, setting,
                                                                     values, tmp_path):
    # without --steps where the epochs differ (--steps would override them)
    common = [x for x in QUICK if x not in ("--steps", "4")] if setting == "epochs" else QUICK
    done = _mpmd(tmp_path / "run", rank0, rank1, common)
    assert done.returncode == 2, done.stdout
    errors = _errors(done.stdout)
    assert len(errors) == 1, done.stdout
    assert errors[0].startswith("Error: ranks were started with different settings"), errors
    assert f"{setting}: rank 0 = {values[0]}, rank 1 = {values[1]}" in errors[0], errors
    assert "Traceback" not in done.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.mpi
@pytest.mark.parametrize("rank1, message", [
    (["--dataset", "synthetic:samples=many"], "samples='many' is not an integer"),
    (["--epochs", "many"], "'many' is not a valid integer"),
    (["--compressor", "topk:ratio=-1"], "ratio"),
])
def test_a_problem_only_rank_1_finds_is_shown_tagged_with_its_rank(rank1, message, tmp_path):
    done = _mpmd(tmp_path / "run", [], rank1)
    assert done.returncode == 2, done.stdout
    errors = _errors(done.stdout)
    assert len(errors) == 1 and errors[0].startswith("Error (rank 1): "), done.stdout
    assert message in errors[0], errors
    assert "Traceback" not in done.stdout


@pytest.mark.mpi
def test_a_stopped_rank_ends_the_job_with_a_message_naming_the_collective(tmp_path):
    out = tmp_path / "stopped"
    # 20 s: long enough that ranks starting a few seconds apart on a busy machine do not trip it
    with training_job(out, "--stall-timeout", 20) as (proc, pids):
        os.kill(pids[1], signal.SIGSTOP)           # rank 1 sleeps for ever, holding its peers
        try:
            output, _ = proc.communicate(timeout=90)   # the guard must end the job on its own
        finally:
            try:
                os.kill(pids[1], signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0, output
    stalled = [line for line in output.splitlines() if "has waited" in line]
    assert stalled and stalled[0].startswith("Error (rank 0): collective 'hvdcomp."), output
    assert "stall timeout 20 s" in stalled[0] and "during step" in stalled[0], stalled
    assert not (out / "summary.json").exists()
