"""`hvdcomp doctor` on this machine, and on environments where Horovod or MPI is missing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multirank import require

HVDCOMP = [sys.executable, "-m", "hvdcomp.cli.main"]


def run_doctor(*args, env=None):
    return subprocess.run([*HVDCOMP, "doctor", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.mpi
@pytest.mark.gloo
def test_doctor_passes_here_and_reports_facts():
    require("mpi")
    require("gloo")
    proc = run_doctor("--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    names = {c["name"]: c for c in report["checks"]}
    assert names["2 ranks over mpi"]["ok"] and names["2 ranks over gloo"]["ok"]
    # both engines of hvdcomp train: torch.distributed's ranks meet through hvdcomp's own start
    assert names["2 ranks over torch.distributed (torchrun, Gloo)"]["ok"]
    assert names["train engines"]["ok"]
    assert report["facts"]["engines"]["usable"] == ["horovod", "torch"]
    assert report["facts"]["engines"]["default_under_torchrun"] == "torch"
    import horovod
    import torch
    assert report["facts"]["horovod"]["version"] == horovod.__version__
    assert report["facts"]["torch"]["version"] == torch.__version__
    assert report["facts"]["mpi"]["implementation"] == "Open MPI"


def test_doctor_without_mpi_fails_and_says_what_to_install(tmp_path):
    # A PATH with no mpirun on it: the machine as it is before Open MPI is installed.
    env = dict(os.environ, PATH=str(tmp_path))
    proc = run_doctor(env=env)
    assert proc.returncode == 1
    assert "mpirun not found on PATH" in proc.stdout
    assert "apt-get install openmpi-bin libopenmpi-dev" in proc.stdout


def test_doctor_without_horovod_fails_and_names_the_setup(tmp_path):
    # Shadow the installed Horovod with a package that fails to import, as a broken or missing
    # build does; everything else in the environment stays real.
    fake = tmp_path / "horovod"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named horovod')\n")
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = run_doctor("--json", env=env)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    horovod_check = next(c for c in report["checks"] if c["name"] == "Horovod")
    assert not horovod_check["ok"]
    assert "No module named horovod" in horovod_check["detail"]
    assert "scripts/setup.sh" in horovod_check["fix"]


def test_cli_module_is_not_installed_as_top_level_cli():
    # The Click app lives in cli/ but must import as hvdcomp.cli, never as `cli`.
    import hvdcomp.cli.main
    assert Path(hvdcomp.cli.main.__file__).parent.name == "cli"
    proc = subprocess.run([sys.executable, "-c", "import cli"], capture_output=True, text=True,
                          cwd="/")
    assert proc.returncode != 0


def test_unknown_subcommand_is_a_usage_error():
    proc = subprocess.run([*HVDCOMP, "no-such-command"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "No such command" in proc.stderr
