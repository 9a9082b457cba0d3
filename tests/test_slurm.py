"""hvdcomp slurm against a real single-node Slurm cluster (slurmctld + slurmd on this machine).

The session fixture starts the cluster with slurm/cluster/start.sh (installing the Debian packages
when root and missing) and stops, by PID, only the daemons it started. A cluster that already
answers ``scontrol ping`` is used as it is and left running.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hvdcomp import slurm_render, slurmjobs, slurmquery
from hvdcomp.slurmwait import wait
from hvdcomp.cli.main import cli
from hvdcomp.sweep import load_spec

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "jobs" / "smoke-digits.toml"
SHIPPED_SPECS = sorted((REPO / "jobs").glob("*.toml"))
VENV_BIN = REPO / ".venv" / "bin"


def _controller_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return "UP" in out.stdout


def _node_takes_jobs() -> bool:
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    return any(state in out.stdout for state in ("idle", "mix", "alloc"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A Slurm cluster that takes jobs; yields the name of its default partition."""
    started = []  # (daemon, pid) this fixture started
    if not (_controller_up() and _node_takes_jobs()):
        daemons_present = shutil.which("slurmctld") and shutil.which("slurmd")
        if os.geteuid() != 0:
            pytest.skip("no Slurm cluster answers, and starting one needs root "
                        + ("" if daemons_present
                           else "(slurmctld/slurmd are not installed either)"))
        out = subprocess.run(["bash", str(REPO / "slurm" / "cluster" / "start.sh")],
                             capture_output=True, text=True, timeout=600)
        started = [(m.group(1), int(m.group(2)))
                   for m in re.finditer(r"^started: (\S+) (\d+)$", out.stdout, re.M)]
        if out.returncode != 0:
            _stop(started)
            pytest.fail(f"slurm/cluster/start.sh failed:\n{out.stdout}\n{out.stderr}")
    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                               timeout=20).stdout.split()[0].rstrip("*")
    try:
        yield partition
    finally:
        _stop(started)


PID_FILES = {"slurmctld": Path("/run/slurmctld.pid"), "slurmd": Path("/run/slurmd.pid"),
             "munged": Path("/run/munge/munged.pid")}


def _stop(started):
    """SIGTERM each daemon we started, by PID, once its /proc entry still names that daemon,
    and remove its PID file when that file still names it."""
    for name, pid in reversed(started):
        pid_file = PID_FILES.get(name)
        if pid_file is not None and pid_file.exists() and pid_file.read_text().strip() == str(pid):
            pid_file.unlink()
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm != name:
            continue
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)


@pytest.fixture
def job_env(monkeypatch):
    """sbatch passes the submitter's environment to the job: put the project's venv first so the
    job's `hvdcomp` is this checkout's."""
    if VENV_BIN.is_dir():
        monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(REPO)  # the spec's jobs run where they are rendered


def _needs_train():
    try:
        import horovod.torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"hvdcomp train needs Horovod: {exc}")


def _cancel_all(spec, paths):
    try:
        slurmjobs.cancel(spec, paths)
    except slurmjobs.SlurmError:
        pass


# ----------------------------------------------------------------------------------------------

def test_smoke_sweep_runs_to_completed_and_collects(slurm_cluster, job_env, tmp_path: Path):
    _needs_train()
    out = tmp_path / "sweep"
    runner = CliRunner()
    spec = load_spec(SMOKE)
    paths = slurm_render.SweepPaths(out)
    try:
        result = runner.invoke(cli, ["slurm", "submit", str(SMOKE), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert result.stdout.count("submitted job") == len(spec.points)
        waited = runner.invoke(cli, ["slurm", "wait", str(SMOKE), "--out", str(out),
                                     "--timeout", "480", "--poll", "2", "--format", "json"])
        rows = [slurmjobs.PointStatus(**row) for row in json.loads(waited.stdout)]
    finally:
        _cancel_all(spec, paths)
    assert waited.exit_code == 0, waited.output
    assert waited.stderr.splitlines()[-1] == "[smoke-digits] 2/2 finished (2 completed)"
    logs = {r.point: Path(r.log).read_text() if r.log and Path(r.log).exists() else ""
            for r in rows}
    for row in rows:
        assert (row.state, row.exit_code) == ("COMPLETED", "0:0"), f"{row}\n{logs[row.point]}"
        assert row.run == "completed"
        record = json.loads(paths.record(row.point).read_text())
        assert record["job_id"] == row.job_id and record["previous_job_ids"] == []
    # Both points ask for the same resources: one job array, task i = point i.
    assert sorted(r.job_id.split("_")[1] for r in rows) == ["0", "1"]
    assert len({r.job_id.split("_")[0] for r in rows}) == 1

    status = runner.invoke(cli, ["slurm", "status", str(SMOKE), "--out", str(out)])
    assert status.exit_code == 0 and status.stdout.count("COMPLETED") == len(spec.points)

    # Submitting again skips finished points and submits nothing.
    again = runner.invoke(cli, ["slurm", "submit", str(SMOKE), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert again.stdout.count("skipped: finished") == len(spec.points)

    # collect: the liec run's ratio against the psgd run, from the two summaries.
    result = runner.invoke(cli, ["collect", str(out), "--format", "json",
                                 "--plot", str(tmp_path / "fig")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["skipped"] == []
    rows = {r["algorithm"]: r for r in data["runs"]}
    assert set(rows) == {"psgd", "liec"}
    summaries = {a: json.loads((Path(rows[a]["run"]) / "summary.json").read_text()) for a in rows}
    sent = {a: summaries[a]["bytes_up"] + summaries[a]["bytes_down"] for a in rows}
    assert rows["liec"]["compression_ratio"] == pytest.approx(sent["psgd"] / sent["liec"])
    assert rows["liec"]["compression_ratio"] > 1
    assert rows["psgd"]["compression_ratio"] == pytest.approx(1.0)
    for algorithm, row in rows.items():
        assert 0 <= row["final_accuracy"] <= 1
        assert row["final_accuracy"] == summaries[algorithm]["final_accuracy"]
    # the figures themselves (which, and what they show) are tests/test_collect.py's
    assert all(p.stat().st_size > 0 for p in (tmp_path / "fig").glob("*.png"))
    assert list((tmp_path / "fig").glob("*.png"))


def test_failing_job_shows_failed_with_exit_code(slurm_cluster, job_env, tmp_path: Path):
    """A 2-rank run train refuses (CIFAR-10 from a folder that does not exist) ends FAILED with
    the exit code train gave (2, a usage error) -- not srun's 143 for the rank it terminated --
    on both points; `wait` exits 1 naming them and `logs` shows a point's output."""
    _needs_train()
    spec_path = tmp_path / "fail.toml"
    spec_path.write_text(f"""
[sweep]
name = "fail"
[train]
model = "mlp"
dataset = "cifar10"
data-dir = "{tmp_path / 'no-such-folder'}"
epochs = 1
algorithm = "psgd"
ranks = 2
[matrix]
seed = [0, 1]
[cluster]
time = "00:05:00"
tasks-per-node = 2
setup = ["if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi"]
[cluster.env]
OMP_NUM_THREADS = 1
""")
    out = tmp_path / "sweep"
    spec, paths = load_spec(spec_path), slurm_render.SweepPaths(out)
    runner = CliRunner()
    try:
        result = runner.invoke(cli, ["slurm", "submit", str(spec_path), "--out", str(out)])
        assert result.exit_code == 0, result.output
        waited = runner.invoke(cli, ["slurm", "wait", str(spec_path), "--out", str(out),
                                     "--timeout", "300", "--poll", "2"])
    finally:
        _cancel_all(spec, paths)
    assert waited.exit_code == 1, waited.output
    assert "2/2 finished (2 failed)" in waited.stderr
    assert "2 of 2 points did not complete" in waited.stderr
    result = runner.invoke(cli, ["slurm", "status", str(spec_path), "--out", str(out),
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 2
    for row in rows:
        log = Path(row["log"]).read_text()
        assert (row["state"], row["exit_code"]) == ("FAILED", "2:0"), log
        assert "hvdcomp train exited with 2" in log
    table = runner.invoke(cli, ["slurm", "status", str(spec_path), "--out", str(out)])
    assert table.stdout.count("FAILED") == 2 and table.stdout.count("2:0") == 2
    alias = runner.invoke(cli, ["slurm", "status", str(spec_path), "--out", str(out), "--json"])
    assert json.loads(alias.stdout) == rows
    shown = runner.invoke(cli, ["slurm", "logs", str(spec_path), rows[0]["point"],
                                "--out", str(out)])
    assert shown.exit_code == 0 and shown.stdout == Path(rows[0]["log"]).read_text()
    unknown = runner.invoke(cli, ["slurm", "logs", str(spec_path), "seed-7", "--out", str(out)])
    assert unknown.exit_code == 2 and "no point 'seed-7'" in unknown.stderr


def test_the_job_exit_code_is_the_failed_ranks_not_sruns(slurm_cluster, job_env, tmp_path: Path):
    """Rank 0 fails with 3 while rank 1 is still busy: srun --kill-on-bad-exit terminates rank 1
    and itself exits 143 (128 + SIGTERM), yet the job must end with the code of the rank that
    failed. The program the job runs ([cluster] hvdcomp) is a stand-in that fails this way on
    purpose -- train's own failures rarely lose that race, and this checks the script around it."""
    rank = tmp_path / "rank.sh"
    rank.write_text('#!/bin/bash\nif [ "${SLURM_PROCID:-0}" = 0 ]; then sleep 1; exit 3; fi\n'
                    "sleep 120\n")
    rank.chmod(0o755)
    spec_path = tmp_path / "race.toml"
    spec_path.write_text(f'[sweep]\nname = "race"\n[train]\nranks = 2\nsteps = 1\n[cluster]\n'
                         f'time = "00:05:00"\ntasks-per-node = 2\nhvdcomp = "{rank}"\n')
    out = tmp_path / "sweep"
    spec, paths = load_spec(spec_path), slurm_render.SweepPaths(out)
    try:
        result = CliRunner().invoke(cli, ["slurm", "submit", str(spec_path), "--out", str(out)])
        assert result.exit_code == 0, result.output
        [row] = wait(spec, paths, timeout=240, poll=1)
    finally:
        _cancel_all(spec, paths)
    log = Path(row.log).read_text()
    assert "srun exited with 143; the first rank to fail was 0, with 3" in log
    assert (row.state, row.exit_code) == ("FAILED", "3:0"), log


def test_held_jobs_are_skipped_then_cancelled(slurm_cluster, job_env, tmp_path: Path):
    out = tmp_path / "sweep"
    spec, paths = load_spec(SMOKE), slurm_render.SweepPaths(out)
    runner = CliRunner()
    try:
        result = runner.invoke(cli, ["slurm", "submit", str(SMOKE), "--out", str(out),
                                     "--sbatch-arg=--hold", "--max-concurrent", "1"])
        assert result.exit_code == 0, result.output
        states = {r.point: r.state for r in slurmjobs.status(spec, paths)}
        assert set(states.values()) == {"PENDING"}
        # one job array for both points, at most one task running at once (Slurm's word for it)
        array_ids = {json.loads(paths.record(p.name).read_text())["job_id"].split("_")[0]
                     for p in spec.points}
        assert len(array_ids) == 1
        shown = subprocess.run(["scontrol", "show", "job", "-o", array_ids.pop()],
                               capture_output=True, text=True, timeout=60).stdout
        assert "ArrayTaskThrottle=1" in shown, shown
        # records and scripts get the user's umask like any file (a colleague may read them)
        umask = os.umask(0)
        os.umask(umask)
        for point in spec.points:
            assert stat.S_IMODE(paths.record(point.name).stat().st_mode) == 0o666 & ~umask
            assert stat.S_IMODE(paths.script(point.name).stat().st_mode) == 0o777 & ~umask

        again = runner.invoke(cli, ["slurm", "submit", str(SMOKE), "--out", str(out)])
        assert again.exit_code == 0 and again.stdout.count("skipped: pending") == len(spec.points)

        cancel = runner.invoke(cli, ["slurm", "cancel", str(SMOKE), "--out", str(out)])
        assert cancel.exit_code == 0 and f"cancelled {len(spec.points)} job(s)" in cancel.stdout
        rows = wait(spec, paths, timeout=60, poll=1)
        assert {r.state for r in rows} == {"CANCELLED"}
    finally:
        _cancel_all(spec, paths)


def test_rejected_submission_records_nothing(slurm_cluster, job_env, tmp_path: Path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["slurm", "submit", str(SMOKE), "--out", str(out),
                                      "--sbatch-arg=--partition=no-such-partition"])
    assert result.exit_code == 1
    assert "sbatch refused" in result.output
    assert "invalid partition" in result.output.lower()  # Slurm's own words
    assert list((out / "jobs").iterdir()) == []


def test_a_bad_value_never_reaches_the_queue(slurm_cluster, job_env, tmp_path: Path):
    """Values train would refuse in the job (a negative learning rate, a batch size of 0)
    stops submit with file:line: key: problem lines: no job is queued, nothing is written."""
    name = f"bad-values-{os.getpid()}"
    text = re.sub(r'(?m)^name = ".*"$', f'name = "{name}"', SMOKE.read_text(), count=1)
    text = text.replace("lr = 0.1", "lr = -0.1", 1).replace("batch-size = 32", "batch-size = 0", 1)
    spec_path = tmp_path / "bad.toml"
    spec_path.write_text(text)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["slurm", "submit", str(spec_path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert (f"{spec_path}:{_line(text, 'lr = -0.1')}: train.lr: --lr must be positive"
            in result.stderr)
    assert f"{spec_path}:{_line(text, 'batch-size = 0')}: train.batch-size: " in result.stderr
    assert not out.exists()
    queued = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%j"], capture_output=True,
                            text=True, timeout=60)
    assert queued.returncode == 0 and name not in queued.stdout


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("spec_path", SHIPPED_SPECS, ids=[p.name for p in SHIPPED_SPECS])
def test_shipped_scripts_pass_sbatch_test_only(slurm_cluster, job_env, spec_path: Path,
                                                tmp_path: Path):
    """Every rendered script is valid bash and Slurm accepts its directives. The paper specs ask
    for GPU nodes this machine does not have, so the size of the request is overridden on the
    command line (which takes precedence over #SBATCH lines); everything else is as rendered."""
    spec = load_spec(spec_path)
    scripts = slurm_render.render(spec, slurm_render.SweepPaths(tmp_path), write=True, workdir=REPO)
    fit_here = [f"--partition={slurm_cluster}", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1",
                "--cpus-per-task=1", "--gpus-per-node=0", "--mem=0"]
    for script in scripts:
        bash_n = subprocess.run(["bash", "-n", str(script.path)], capture_output=True, text=True)
        assert bash_n.returncode == 0, bash_n.stderr
        test_only = subprocess.run(["sbatch", "--test-only", *fit_here, str(script.path)],
                                   capture_output=True, text=True, timeout=60)
        assert test_only.returncode == 0, f"{script.path}: {test_only.stderr}"
        assert "to start at" in test_only.stderr


REQUEUE_STEPS = 2000


def test_requeued_job_resumes_exactly(slurm_cluster, job_env, tmp_path: Path):
    """USR1 to the batch script -- what Slurm sends `requeue-warning` seconds before the time
    limit (#SBATCH --signal=B:USR1@60) -- requeues the job; its next start resumes from the latest
    checkpoint, and the run ends exactly as an uninterrupted run of the same options does."""
    _needs_train()
    train = {"model": "mlp", "dataset": "digits", "algorithm": "psgd", "seed": 0,
             "steps": REQUEUE_STEPS, "checkpoint-every": "100steps"}
    spec_path = tmp_path / "requeue.toml"
    spec_path.write_text('[sweep]\nname = "requeue"\n[train]\nranks = 1\n'
                         + "".join(f"{k} = {json.dumps(v)}\n" for k, v in train.items())
                         + '[cluster]\ntime = "00:10:00"\nmax-requeues = 1\n'
                         'setup = ["if [ -f .venv/bin/activate ]; then '
                         'source .venv/bin/activate; fi"]\n'
                         '[cluster.env]\nOMP_NUM_THREADS = 1\n')
    out = tmp_path / "sweep"
    spec, paths = load_spec(spec_path), slurm_render.SweepPaths(out)
    [point] = spec.points
    try:
        result = CliRunner().invoke(cli, ["slurm", "submit", str(spec_path), "--out", str(out)])
        assert result.exit_code == 0, result.output
        job_id = json.loads(paths.record(point.name).read_text())["job_id"]
        checkpoints = paths.run_dir(point.name) / "checkpoints"
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("ckpt-*.pt")):
            state = slurmquery.job_states([job_id])[job_id].state
            assert state in ("PENDING", "RUNNING") and time.monotonic() < deadline, state
            time.sleep(0.5)
        signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id],
                                   capture_output=True, text=True, timeout=60)
        assert signalled.returncode == 0, signalled.stderr
        [row] = wait(spec, paths, timeout=600, poll=1)
    finally:
        _cancel_all(spec, paths)
    log = Path(row.log).read_text()
    assert (row.state, row.exit_code, row.run) == ("COMPLETED", "0:0", "completed"), log
    assert f"time limit near: requeueing job {job_id}" in log
    assert "(restart 1)" in log and "resuming from the latest checkpoint" in log
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                           text=True, timeout=60).stdout
    assert "Restarts=1" in shown, shown

    reference = tmp_path / "uninterrupted"
    args = [a for k, v in train.items() for a in (f"--{k}", str(v))]
    done = subprocess.run([str(VENV_BIN / "hvdcomp"), "train", *args, "--quiet",
                           "--out", str(reference)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = json.loads((Path(row.run_dir) / "summary.json").read_text())
    whole = json.loads((reference / "summary.json").read_text())
    assert resumed["steps"] == whole["steps"] == REQUEUE_STEPS
    for key in ("final_test_loss", "final_accuracy", "best_accuracy"):
        assert resumed[key] == whole[key], key


def test_queries_ask_again_after_a_transient_failure(slurm_cluster, tmp_path: Path, monkeypatch):
    """A slurmctld that is busy for a moment ("Socket timed out") is asked again; an answer
    ("Invalid job id") is not. The first call of this squeue fails as a busy controller makes
    it fail; later calls are the real squeue."""
    real = shutil.which("squeue")
    calls = tmp_path / "calls"
    shim = tmp_path / "bin" / "squeue"
    shim.parent.mkdir()
    shim.write_text(f"""#!/bin/bash
echo "$*" >> {calls}
if [ "$(wc -l < {calls})" = 1 ]; then
    echo "squeue: error: slurm_load_jobs error: Socket timed out on send/recv operation" >&2
    exit 1
fi
exec {real} "$@"
""")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}{os.pathsep}{os.environ['PATH']}")
    answer = slurmquery.query(["squeue", "-h", "-o", "%i"], delays=(0.1, 0.1))
    assert answer.returncode == 0 and len(calls.read_text().splitlines()) == 2
    calls.write_text("primed\n")
    refused = slurmquery.query(["squeue", "-h", "-j", "999999999"], delays=(0.1, 0.1))
    assert refused.returncode != 0 and "Invalid job id" in refused.stderr
    assert len(calls.read_text().splitlines()) == 2  # asked once
