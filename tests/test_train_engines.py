"""``hvdcomp train`` on the two engines: the same run under ``torchrun`` (torch.distributed over
Gloo) and under ``mpirun`` with Horovod gives the same records and the same final parameters on
every rank, bit for bit, for every algorithm; ``mpirun --engine torch`` too.

Why bit for bit: both engines move compressed payloads as bytes (allgather, alltoall: exact), and
every sum is over 2 ranks, where a + b = b + a exactly in IEEE arithmetic whatever order MPI or
Gloo add in; ``average`` is that sum times 1/2 (exact) on both. With 3 or more ranks the engines
may add in different orders and then agree only to rounding (docs/train.md, "Engines").

Every run is tiny (digits, 6 steps of 32 samples per rank) and checkpoints its last step, so the
final parameters and optimizer states of both ranks can be compared from the shards.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import multirank
from hvdcomp.train.checkpoint import load_all
from hvdcomp.train.config import ALGORITHMS
from hvdcomp.train.results import read_metrics
from test_train_ranks import _assert_same_tensors

HVDCOMP = Path(sys.executable).parent / "hvdcomp"
TORCHRUN = Path(sys.executable).parent / "torchrun"
STEPS = 6
TINY = ["--steps", STEPS, "--log-every", 2, "--checkpoint-every", f"{STEPS}steps"]
#: options that make short runs exercise each method's distinctive round
EXTRA = {"liec": ["--period", "2"],          # exact averaging rounds within 6 steps
         "dgc": ["--compressor", "dgc:ratio=0.05"]}
CLOCKS = {"wall_time", "time_compute", "time_compress", "time_comm"}


def _train(out: Path, launcher: str, *args, timeout: float = 300):
    """``hvdcomp train`` on 2 ranks: ``torchrun`` (standalone: a free port) or ``mpirun``."""
    if not TORCHRUN.exists() or not HVDCOMP.exists():
        pytest.skip(f"{TORCHRUN} or {HVDCOMP} missing: install the project (scripts/setup.sh)")
    argv = [str(HVDCOMP), "train", "--out", str(out), "--quiet", *map(str, args)]
    if launcher == "torchrun":
        cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *argv]
    else:
        multirank.require("mpi")
        cmd = multirank.launch_command(2, "mpi", argv)
    return multirank.run_command(cmd, timeout)


def _records(out: Path):
    return [{k: v for k, v in record.items() if k not in CLOCKS}
            for record in read_metrics(out / "metrics.jsonl")]


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics (clocks aside), summary figures and final state of every rank, bit for bit."""
    assert _records(a) == _records(b)
    sa, sb = (json.loads((run / "summary.json").read_text()) for run in (a, b))
    for key in ("final_accuracy", "final_test_loss", "bytes_up", "bytes_down", "steps"):
        assert sa[key] == sb[key], key
    ca, cb = load_all(a / "checkpoints" / "latest.pt"), load_all(b / "checkpoints" / "latest.pt")
    assert ca["step"] == cb["step"] == STEPS
    for rank in range(2):
        _assert_same_tensors(ca["ranks"][rank]["model"], cb["ranks"][rank]["model"],
                             f"rank{rank}.model")
        _assert_same_tensors(ca["ranks"][rank]["optimizer"], cb["ranks"][rank]["optimizer"],
                             f"rank{rank}.optimizer")


def _engine_of(out: Path) -> tuple:
    config = json.loads((out / "config.json").read_text())
    return config["engine"], config["launcher"]


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_torchrun_equals_horovod_bit_for_bit(algorithm, tmp_path):
    args = ["--algorithm", algorithm, *TINY, *EXTRA.get(algorithm, [])]
    horovod, torch_ = tmp_path / "horovod", tmp_path / "torch"
    done = _train(horovod, "mpirun", *args, "--engine", "horovod")
    assert done.returncode == 0, done.stdout
    done = _train(torch_, "torchrun", *args)        # torchrun: the torch engine by default
    assert done.returncode == 0, done.stdout
    assert _engine_of(horovod) == ("horovod", "mpirun")
    assert _engine_of(torch_) == ("torch", "torchrun")
    assert_same_run(horovod, torch_)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["psgd", "liec"])
def test_mpirun_with_the_torch_engine_equals_horovod(algorithm, tmp_path):
    args = ["--algorithm", algorithm, *TINY, *EXTRA.get(algorithm, [])]
    horovod, torch_ = tmp_path / "horovod", tmp_path / "torch"
    assert _train(horovod, "mpirun", *args, "--engine", "horovod").returncode == 0
    done = _train(torch_, "mpirun", *args, "--engine", "torch")
    assert done.returncode == 0, done.stdout
    assert _engine_of(torch_) == ("torch", "mpirun")
    assert_same_run(horovod, torch_)


@pytest.mark.mpi
def test_horovod_under_torchrun_is_refused_with_one_line(tmp_path):
    done = _train(tmp_path / "run", "torchrun", "--steps", 2, "--engine", "horovod", timeout=120)
    assert done.returncode != 0
    # said once, by rank 0 (torchrun then reports its failed workers in its own words)
    errors = [line for line in done.stdout.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "torchrun" in errors[0] and "--engine torch" in errors[0], \
        done.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- where the torch engine's ranks meet (no ranks started) -------------------------------------
def test_rendezvous_from_each_launchers_environment():
    from hvdcomp.train.config import ConfigError, detect_launcher
    from hvdcomp.train.engine import derived_port, rendezvous, usable_engine

    def meet(env):
        return rendezvous(detect_launcher(env), env)

    one_node = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                "PMIX_NAMESPACE": "4050"}
    where = meet(one_node)
    assert (where.rank, where.world_size, where.local_rank, where.address) == (1, 2, 1, "127.0.0.1")
    assert where.port == derived_port("4050") and 29501 <= where.port < 49501
    assert meet({**one_node, "MASTER_PORT": "1234"}).port == 1234
    with pytest.raises(ConfigError, match="MASTER_ADDR"):        # two nodes, no address
        meet({**one_node, "OMPI_COMM_WORLD_LOCAL_SIZE": "1"})
    two_nodes = {**one_node, "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "MASTER_ADDR": "node7"}
    assert meet(two_nodes).address == "node7"
    srun = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
            "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
            "SLURM_JOB_ID": "77", "MASTER_ADDR": "node1"}
    where = meet(srun)
    assert (where.rank, where.world_size, where.local_rank, where.local_size) == (3, 4, 1, 2)
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555",
                "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert (meet(torchrun).rank, meet(torchrun).port) == (1, 29555)
    with pytest.raises(ConfigError, match="horovodrun"):
        meet({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"})
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        meet({**one_node, "MASTER_PORT": "http"})
    # ranks that must fail together meet in an engine that can start under their launcher
    assert usable_engine("horovod", detect_launcher(torchrun)) == "torch"
    assert usable_engine(None, detect_launcher(torchrun)) == "torch"
