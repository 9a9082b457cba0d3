"""`hvdcomp train --algorithm monna` on 5 real ranks, one of them a simulated sign-flipping worker.

The claim of MoNNA (Farhadkhani et al. 2023) is robustness: with nearest-neighbour averaging the
honest workers still learn while a faulty worker sends −mean(θ_honest); with plain averaging the
same attack shrinks every model towards zero (θ ← (4θ − θ)/5 = 0.6θ each step) and learning fails.
"""
from __future__ import annotations

import json

import pytest

from test_train_ranks import _train

ATTACK = ["--algorithm", "monna", "--algorithm-option", "f=1", "--algorithm-option",
          "attack=sign_flip", "--algorithm-option", "beta=0.9", "--epochs", "15", "--lr", "0.5",
          "--schedule", "constant"]


@pytest.mark.mpi
def test_nna_learns_under_sign_flipping_where_averaging_collapses(tmp_path):
    accuracy = {}
    for aggregator in ("nna", "mean"):
        out = tmp_path / aggregator
        done = _train(out, *ATTACK, "--algorithm-option", f"aggregator={aggregator}", np=5)
        assert done.returncode == 0, done.stdout
        summary = json.loads((out / "summary.json").read_text())
        # the simulation is named in the results, not only in the logs
        assert summary["faulty_ranks"] == [4] and summary["attack"] == "sign_flip"
        assert json.loads((out / "config.json").read_text())["simulated_faults"] is True
        assert "SIMULATED FAULTY WORKERS: ranks [4] of 5" in done.stdout
        accuracy[aggregator] = summary["final_accuracy"]
    # P-SGD reaches about 0.97 on digits in this budget; chance is 0.1
    assert accuracy["nna"] > 0.85, accuracy
    assert accuracy["mean"] < 0.5, accuracy


@pytest.mark.mpi
def test_monna_options_are_checked_before_training(tmp_path):
    done = _train(tmp_path / "bad", "--algorithm", "monna", "--algorithm-option", "f=1",
                  "--algorithm-option", "attack=sign_flip", np=2)
    assert done.returncode == 2
    assert "n > 2f; got n = 2, f = 1" in done.stdout
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
