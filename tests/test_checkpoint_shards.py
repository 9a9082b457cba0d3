"""Sharded checkpoints (hvdcomp/train/checkpoint.py): every rank writes its own shard, rank 0 a
manifest once every shard is on disk; a resume reads the manifest and its own shard only, and
continues exactly, on either engine.

The file-level tests run the collective part over the in-process simulator (real files, real
failures: a rank whose checkpoint folder is a file); the resume tests launch real ranks
(``torchrun`` and ``mpirun``) exactly as a user does.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvdcomp.comm import simulate
from hvdcomp.train import checkpoint as ckpt
from test_train_engines import CLOCKS, _train
from test_train_ranks import _assert_same_tensors
from hvdcomp.train.results import read_metrics

HVDCOMP = Path(sys.executable).parent / "hvdcomp"


def _state(rank: int, step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(10 * step + rank))},
            "optimizer": {"state": {}}, "rng": ckpt.rng_state(), "progress": {"rank": rank}}


def _save(folder: Path, step: int, keep: int = 2, folders=None):
    def worker(comm):
        where = folders[comm.rank] if folders else folder
        try:
            return ckpt.save_sharded(comm, where, step, _state(comm.rank, step),
                                     {"epoch": 0, "config": {}, "progress": {}}, keep=keep)
        except OSError as exc:
            return exc
    return simulate(2, worker)


def test_each_rank_writes_its_shard_and_rank_0_the_manifest(tmp_path):
    folder = tmp_path / "checkpoints"
    manifest_path, other = _save(folder, 4)
    assert other is None and manifest_path == folder / "ckpt-4.pt"
    assert sorted(p.name for p in folder.iterdir()) == \
        ["ckpt-4.pt", "ckpt-4.rank0.shard", "ckpt-4.rank1.shard", "latest.pt"]
    manifest = ckpt.load_checkpoint(folder / "latest.pt")
    assert manifest["shards"] == ["ckpt-4.rank0.shard", "ckpt-4.rank1.shard"]
    assert "ranks" not in manifest       # no rank's state in the manifest
    everything = ckpt.load_all(folder / "latest.pt")
    for rank in range(2):
        assert torch.equal(everything["ranks"][rank]["model"]["w"], torch.full((3,), 40.0 + rank))
        mine = ckpt.load_for_rank(folder / "latest.pt", rank)["mine"]
        assert mine["progress"] == {"rank": rank}


def test_old_checkpoints_their_shards_and_orphans_are_pruned(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (2, 4):
        _save(folder, step)
    # a run killed between its shards and its manifest at step 5, and a checkpoint in progress
    ckpt.write_shard(folder, 5, 0, 2, _state(0, 5))
    ckpt.write_shard(folder, 8, 1, 2, _state(1, 8))
    _save(folder, 6)
    assert sorted(p.name for p in folder.iterdir()) == [
        "ckpt-4.pt", "ckpt-4.rank0.shard", "ckpt-4.rank1.shard", "ckpt-6.pt",
        "ckpt-6.rank0.shard", "ckpt-6.rank1.shard", "ckpt-8.rank1.shard", "latest.pt"]
    ckpt.remove_all(folder)
    assert list(folder.iterdir()) == []


def test_a_rank_that_cannot_write_means_no_manifest_and_an_error_on_every_rank(tmp_path):
    good, blocked = tmp_path / "checkpoints", tmp_path / "not-a-folder"
    blocked.write_text("a file where rank 1's folder should be")
    on_rank0, on_rank1 = _save(good, 3, folders=[good, blocked])
    assert isinstance(on_rank1, OSError) and not isinstance(on_rank1, ckpt.ShardWriteFailed)
    assert isinstance(on_rank0, ckpt.ShardWriteFailed) and "rank(s) 1" in str(on_rank0)
    assert ckpt.list_checkpoints(good) == [] and not (good / "latest.pt").exists()


def test_a_missing_or_foreign_shard_is_refused_by_name(tmp_path):
    folder = tmp_path / "checkpoints"
    _save(folder, 2)
    (folder / "ckpt-2.rank1.shard").unlink()
    with pytest.raises(ckpt.CheckpointError, match="ckpt-2.rank1.shard, which is missing"):
        ckpt.load_for_rank(folder / "latest.pt", 1)
    ckpt.write_shard(folder, 7, 1, 2, _state(1, 7))
    (folder / "ckpt-7.rank1.shard").rename(folder / "ckpt-2.rank1.shard")
    with pytest.raises(ckpt.CheckpointError, match="is not rank 1's shard"):
        ckpt.load_for_rank(folder / "latest.pt", 1)


def test_a_format_1_checkpoint_still_resumes(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"format": ckpt.LEGACY_FORMAT, "step": 3, "world_size": 2, "config": {},
                "progress": {}, "ranks": [_state(0, 3), _state(1, 3)]}, folder / "ckpt-3.pt")
    resumed = ckpt.load_for_rank(ckpt.latest_checkpoint(folder), 1)
    assert resumed["step"] == 3 and torch.equal(resumed["mine"]["model"]["w"],
                                                torch.full((3,), 31.0))


# --- real ranks ---------------------------------------------------------------------------------
#: LIEC-SGD: local models that differ per rank between averaging rounds, worker and server errors;
#: augmentation: per-step randomness that must replay. Checkpoints every 4 steps, the crash after
#: step 10, so steps 9-10 are replayed from the step-8 checkpoint.
RESUME = ["--algorithm", "liec", "--period", "3", "--steps", 12, "--log-every", 2,
          "--checkpoint-every", "4steps", "--augment"]


def _records(out: Path):
    return [{k: v for k, v in r.items() if k not in CLOCKS}
            for r in read_metrics(out / "metrics.jsonl")]


def _assert_same_final_state(a: Path, b: Path) -> None:
    sa, sb = (ckpt.load_all(run / "checkpoints" / "latest.pt") for run in (a, b))
    assert sa["step"] == sb["step"] == 12
    for rank in range(2):
        _assert_same_tensors(sa["ranks"][rank]["model"], sb["ranks"][rank]["model"], f"{rank}")
        _assert_same_tensors(sa["ranks"][rank]["optimizer"], sb["ranks"][rank]["optimizer"],
                             f"{rank}.optimizer")
    assert _records(a) == _records(b)


@pytest.mark.mpi
@pytest.mark.parametrize("first, then", [("torchrun", "torchrun"), ("mpirun", "torchrun")],
                         ids=["torch-engine", "horovod-then-torch"])
def test_an_interrupted_run_resumes_bit_for_bit(first, then, tmp_path):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert _train(whole, first, *RESUME).returncode == 0
    stopped = _train(crashed, first, *RESUME, "--stop-after-steps", 10)
    assert stopped.returncode != 0 and not (crashed / "summary.json").exists(), stopped.stdout
    assert ckpt.load_checkpoint(crashed / "checkpoints" / "latest.pt")["step"] == 8
    resumed = _train(crashed, then, *RESUME, "--resume")
    assert resumed.returncode == 0, resumed.stdout
    _assert_same_final_state(whole, crashed)


@pytest.mark.mpi
def test_resuming_with_another_world_size_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "torchrun", "--steps", 2, "--checkpoint-every", "2steps").returncode == 0
    done = subprocess.run([str(HVDCOMP), "train", "--out", str(out), "--steps", "2",
                           "--checkpoint-every", "2steps", "--resume", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "written by 2 ranks, this run has 1" in lines[0], done.stderr
