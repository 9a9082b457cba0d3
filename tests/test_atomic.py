"""Atomic writes (hvdcomp/atomic.py): results get the permissions any new file gets under the
user's umask (a colleague's `hvdcomp collect` must be able to read them), and a failed write
leaves the old file and no temporary file behind.

The expected modes are computed here from the umask the test sets (0o666 & ~umask for data,
0o777 & ~umask for scripts), and compared with what ``open()`` itself gives a new file."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hvdcomp.atomic import atomic_write, atomic_write_text


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_file_mode(folder: Path) -> int:
    """What open() gives a new file here: the reference the atomic writer must match."""
    probe = folder / "probe-by-open"
    with open(probe, "w"):
        pass
    mode = mode_of(probe)
    probe.unlink()
    return mode


def test_new_files_get_the_umask_mode_like_any_file(tmp_path: Path, umask):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "{}\n")
    assert mode_of(target) == 0o666 & ~umask == plain_file_mode(tmp_path)
    atomic_write(tmp_path / "ckpt.pt", lambda f: f.write(b"\x00\x01"), binary=True)
    assert mode_of(tmp_path / "ckpt.pt") == 0o666 & ~umask
    atomic_write_text(tmp_path / "job.sbatch", "#!/bin/bash\n", mode=0o777)
    assert mode_of(tmp_path / "job.sbatch") == 0o777 & ~umask


def test_replacing_a_file_gives_the_new_content_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "config.json"
    atomic_write_text(target, "old\n")
    atomic_write_text(target, "new ✓\n")
    assert target.read_text(encoding="utf-8") == "new ✓\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_failing_writer_keeps_the_old_file(tmp_path: Path):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old\n")

    def half_then_fail(handle):
        handle.write("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_run_results_and_checkpoints_are_readable_by_others(tmp_path: Path):
    """The files of the issue: config.json, env.json, summary.json and checkpoints were 0600."""
    pytest.importorskip("torch")
    from hvdcomp.train.checkpoint import save_checkpoint
    from hvdcomp.train.results import RunDirectory
    old = os.umask(0o022)
    try:
        run = RunDirectory(tmp_path / "run")
        run.start({"algorithm": "liec"}, {"hostname": "x"}, resume_step=None)
        run.finish({"status": "completed"})
        path = save_checkpoint(run.checkpoints, {"step": 3, "model": {}}, keep=1)
    finally:
        os.umask(old)
    for name in ("config.json", "env.json", "summary.json", "metrics.jsonl"):
        assert mode_of(run.root / name) == 0o644, name
    assert mode_of(path) == 0o644
    assert json.loads((run.root / "summary.json").read_text()) == {"status": "completed"}
