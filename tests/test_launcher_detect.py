"""Which launcher a run records (config.json "launcher"), asked of real launchers: the environment
``horovodrun --mpi`` and plain ``mpirun`` give their ranks, not a hand-written imitation of it."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from multirank import launcher_env, require, run_command

PRINT_LAUNCHER = ("from hvdcomp.train.config import detect_launcher; d = detect_launcher(); "
                  "print('launcher=%s rank=%d size=%d' % (d['name'], d['rank'], d['world_size']))")


def _launchers_seen(cmd) -> list:
    done = run_command(cmd, timeout=120, env=launcher_env())
    assert done.returncode == 0, done.stdout
    # horovodrun tags each line ("[1,0]<stdout>:launcher=...") and may interleave two ranks'
    # output on one line, tags included: pick out each record by its own shape
    return sorted(re.findall(r"launcher=(\w+ rank=\d+ size=\d+)", done.stdout))


@pytest.mark.mpi
def test_horovodrun_with_mpi_is_recorded_as_horovodrun():
    require("mpi")
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    seen = _launchers_seen([horovodrun, "--mpi", "-np", "2", "-H", "localhost:2",
                            sys.executable, "-c", PRINT_LAUNCHER])
    assert seen == ["horovodrun rank=0 size=2", "horovodrun rank=1 size=2"]


@pytest.mark.mpi
def test_plain_mpirun_is_recorded_as_mpirun():
    require("mpi")
    seen = _launchers_seen(["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none",
                            sys.executable, "-c", PRINT_LAUNCHER])
    assert seen == ["mpirun rank=0 size=2", "mpirun rank=1 size=2"]


def test_torchrun_is_recorded_as_torchrun_with_its_rank():
    """torchrun's workers carry RANK/WORLD_SIZE; Slurm's (srun torchrun ...) must not win."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**launcher_env(), "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    done = run_command([torchrun, "--standalone", "--nproc_per_node", "2", "--no-python",
                        sys.executable, "-c", PRINT_LAUNCHER], timeout=120, env=env)
    assert done.returncode == 0, done.stdout
    seen = sorted(re.findall(r"launcher=(\w+ rank=\d+ size=\d+)", done.stdout))
    assert seen == ["torchrun rank=0 size=2", "torchrun rank=1 size=2"]
