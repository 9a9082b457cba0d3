"""What ships inside the package: sbatch templates, example sweep specs, the single-node cluster
scripts (hvdcomp/shipped_files.py). The wheel test builds the wheel, installs it into a fresh
virtual environment that borrows only the third-party packages (torch, Horovod, ...) of this
checkout's .venv, and runs `hvdcomp slurm render` and a short `hvdcomp train` from a folder far
from the checkout -- as on a cluster login node after `pip install hvdcomp-*.whl`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from click.testing import CliRunner

from hvdcomp.cli.main import cli
from hvdcomp.shipped_files import TEMPLATES_ENV, example_specs

REPO = Path(__file__).resolve().parent.parent


def test_every_spec_in_jobs_is_an_example():
    """In a checkout the examples are jobs/ itself (hvdcomp/shipped/jobs links to it); the wheel
    test below checks that the wheel carries them all."""
    assert sorted(example_specs()) == sorted(p.stem for p in (REPO / "jobs").glob("*.toml"))


def test_a_shipped_example_is_a_spec_by_name(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["slurm", "render", "smoke-digits", "--out", "sweep"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "sweep" / "scripts").iterdir()) == [
        "algorithm-liec_compressor-sign.sbatch", "algorithm-psgd_compressor-none.sbatch"]
    unknown = CliRunner().invoke(cli, ["slurm", "render", "smoke-digitz"])
    assert unknown.exit_code == 2
    assert "no shipped example of that name; shipped examples: " in unknown.stderr
    assert "smoke-digits" in unknown.stderr


def test_examples_lists_and_copies(tmp_path: Path):
    listed = CliRunner().invoke(cli, ["slurm", "examples"])
    assert listed.exit_code == 0 and "smoke-digits" in listed.stdout
    copied = CliRunner().invoke(cli, ["slurm", "examples", "--copy", str(tmp_path / "mine")])
    assert copied.exit_code == 0, copied.output
    assert (tmp_path / "mine" / "smoke-digits.toml").read_text() == \
        (REPO / "jobs" / "smoke-digits.toml").read_text()
    assert os.access(tmp_path / "mine" / "cluster" / "start.sh", os.X_OK)


def test_templates_folder_override(tmp_path: Path, monkeypatch):
    spec = REPO / "jobs" / "smoke-digits.toml"
    own = tmp_path / "templates"
    own.mkdir()
    monkeypatch.setenv(TEMPLATES_ENV, str(own))
    missing = CliRunner().invoke(cli, ["slurm", "render", str(spec), "--dry-run"])
    assert missing.exit_code == 2
    assert f"sbatch template job.sbatch.j2 not found in {own} (${TEMPLATES_ENV})" in missing.stderr
    (own / "job.sbatch.j2").write_text("#!/bin/bash\n# my site's template: {{ point_name }}\n")
    mine = CliRunner().invoke(cli, ["slurm", "render", str(spec), "--dry-run"])
    assert mine.exit_code == 0, mine.output
    assert "# my site's template: algorithm-psgd_compressor-none" in mine.stdout


def _fresh_environment(tmp_path: Path) -> Path:
    """A virtual environment holding the freshly built wheel and nothing else of this checkout;
    a .pth line lends it the site-packages of the running interpreter (torch and Horovod take
    minutes to build, and nothing may be downloaded). A plain path line does not run that
    folder's own .pth files, so this checkout's editable install stays out."""
    wheels, env = tmp_path / "wheels", tmp_path / "env"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", str(REPO), "-w", str(wheels)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = wheels.glob("hvdcomp-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True,
                   timeout=300)
    installed = subprocess.run([sys.executable, "-m", "pip", "--python",
                                str(env / "bin" / "python"), "install", "--no-deps", "-q",
                                str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env_site = subprocess.run([str(env / "bin" / "python"), "-c",
                               "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    (Path(env_site) / "borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return env


@pytest.mark.slow
def test_the_installed_wheel_renders_and_trains_anywhere(tmp_path: Path):
    env = _fresh_environment(tmp_path)
    elsewhere = tmp_path / "login-node-home"
    elsewhere.mkdir()
    run_env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", TEMPLATES_ENV, "VIRTUAL_ENV")}
    run_env.update(PATH=f"{env / 'bin'}{os.pathsep}{run_env['PATH']}", OMP_NUM_THREADS="1")

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=elsewhere,
                              env=run_env)

    where = run(str(env / "bin" / "python"), "-c", "import hvdcomp; print(hvdcomp.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(env)), where.stdout  # the wheel's copy, not the checkout

    rendered = run(str(env / "bin" / "hvdcomp"), "slurm", "render", "smoke-digits")
    assert rendered.returncode == 0, rendered.stderr
    scripts = sorted((elsewhere / "runs" / "smoke-digits" / "scripts").glob("*.sbatch"))
    assert [str(p) for p in scripts] == sorted(rendered.stdout.split())
    assert len(scripts) == 2 and "values checked as hvdcomp train will" in rendered.stderr
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        assert f"cd {elsewhere}\n" in script.read_text()

    listed = run(str(env / "bin" / "hvdcomp"), "slurm", "examples")
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split()[0] for line in listed.stdout.splitlines()) == \
        sorted(p.stem for p in (REPO / "jobs").glob("*.toml"))
    copied = run(str(env / "bin" / "hvdcomp"), "slurm", "examples", "--copy", "mine")
    assert copied.returncode == 0, copied.stderr
    assert os.access(elsewhere / "mine" / "cluster" / "start.sh", os.X_OK)
    assert (elsewhere / "mine" / "smoke-digits.toml").is_file()

    trained = run(str(env / "bin" / "hvdcomp"), "train", "--steps", "3", "--quiet",
                  "--out", "run")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    summary = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("completed", 3)
