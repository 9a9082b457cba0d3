"""Sweep points as Slurm jobs: render sbatch scripts, submit, watch and cancel them.

The sweep directory (``[sweep] output`` of the spec, or ``--out``) holds everything::

    OUTPUT/
      scripts/<point>.sbatch     one script per point, deterministic names (render)
      logs/<point>.<jobid>.out   Slurm's output of each job (appended across requeues)
      jobs/<point>.json          the job record: job id, script, times, earlier job ids (submit)
      runs/<point>/              the run directory ``hvdcomp train --out`` writes (docs/design.md)

A job record is written atomically (temporary file + ``os.replace``) and only after ``sbatch``
printed a job id, so a missing ``sbatch`` or a rejected submission never leaves half a record.
States come from ``squeue`` (pending and running jobs), ``scontrol show job`` (exit codes of
recently finished jobs) and ``sacct`` (older ones; ``sacct -c`` where there is no slurmdbd).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .atomic import atomic_write_text
from .errors import UserError
from .sweep import SweepPoint, SweepSpec, TrainOptions, train_arguments

#: Where the sbatch templates live: the repository's slurm/ folder (override with an env var).
TEMPLATE_DIR = Path(os.environ.get("HVDCOMP_SLURM_TEMPLATES",
                                   Path(__file__).resolve().parent.parent / "slurm"))
TEMPLATE_NAME = "job.sbatch.j2"

#: Slurm job states after which a job will not run again by itself.
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


class SlurmError(UserError, RuntimeError):
    """Slurm cannot be used from here (a command missing, a job record or template unreadable):
    something the user fixes; ``hvdcomp`` prints the message and exits 2."""


class SlurmRefused(SlurmError):
    """Slurm answered no (sbatch or scancel refused, no answer in time, jobs not finished): the
    message carries what Slurm said; exit code 1, as a failed command rather than bad input."""
    exit_code = 1


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPaths:
    root: Path

    @property
    def scripts(self) -> Path:
        return self.root / "scripts"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def script(self, point: str) -> Path:
        return self.scripts / f"{point}.sbatch"

    def record(self, point: str) -> Path:
        return self.jobs / f"{point}.json"

    def run_dir(self, point: str) -> Path:
        return self.runs / point

    def log(self, point: str, job_id: str) -> Path:
        return self.logs / f"{point}.{job_id}.out"


def sweep_paths(spec: SweepSpec, output: "str | Path | None" = None) -> SweepPaths:
    """The sweep directory: ``output`` if given, else the spec's ``[sweep] output``; relative paths
    are taken from the current directory (where the jobs will also run unless ``workdir`` says)."""
    return SweepPaths(Path(output or spec.output).resolve())


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RenderedScript:
    point: SweepPoint
    path: Path
    text: str


def _partition_cpus(partition: Optional[str]) -> Optional[int]:
    """CPUs per node of a partition as sinfo reports them (the smallest node), or None."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-o", "%c"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts = [int(m) for m in re.findall(r"\d+", out.stdout)] if out.returncode == 0 else []
    return min(counts) if counts else None


def _resume_arguments(options: TrainOptions) -> str:
    """``--resume`` as the train command takes it: a switch, or the checkpoint path."""
    option = options.lookup("resume")
    if option is not None and option.is_flag:
        return option.flag
    flag = option.flag if option else "--resume"
    return f'{flag} "$RUN_DIR/checkpoints/latest.pt"'


def _overwrite_arguments(options: TrainOptions) -> str:
    """The switch that lets train replace an earlier attempt's files, when train has one."""
    option = options.lookup("overwrite")
    return option.flag if option is not None and option.is_flag else ""


def _template():
    try:
        import jinja2
    except ImportError:  # pragma: no cover - jinja2 is a dependency
        raise SlurmError("rendering sbatch scripts needs jinja2: pip install jinja2") from None
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    try:
        return env.get_template(TEMPLATE_NAME)
    except jinja2.TemplateNotFound:
        raise SlurmError(f"sbatch template {TEMPLATE_DIR / TEMPLATE_NAME} not found; "
                         "set HVDCOMP_SLURM_TEMPLATES to the folder that holds it") from None


def render_point(spec: SweepSpec, point: SweepPoint, paths: SweepPaths,
                 cpus_per_node: Optional[int] = None, workdir: "str | Path | None" = None) -> str:
    """The sbatch script of one point. ``cpus_per_node`` decides ``--overcommit`` when the spec
    says ``overcommit = "auto"`` and gives no ``cpus-per-node`` of its own."""
    cluster = spec.cluster
    nodes, per_node = cluster.layout(point.ranks)
    cpus_wanted = per_node * cluster.cpus_per_task
    cpus_there = cluster.cpus_per_node or cpus_per_node
    if cluster.overcommit == "auto":
        overcommit = bool(cpus_there and cpus_wanted > cpus_there)
    else:
        overcommit = bool(cluster.overcommit)
    q = shlex.quote
    workdir = Path(cluster.workdir or workdir or Path.cwd()).resolve()
    train_args = " ".join(q(a) for a in train_arguments(point, spec.train_options))
    return _template().render(
        banner="hvdcomp sweep job",
        sweep_name=spec.name, point_name=point.name, spec_path=str(spec.path),
        job_name=f"{spec.name}.{point.name}",
        log_pattern=str(paths.logs / f"{point.name}.%j.out"),
        nodes=nodes, ranks=point.ranks, tasks_per_node=per_node,
        cpus_per_task=cluster.cpus_per_task, time=cluster.time,
        partition=cluster.partition, account=cluster.account, qos=cluster.qos, mem=cluster.mem,
        gpus_per_node=cluster.gpus_per_node, gpu_bind=cluster.gpu_bind,
        overcommit=overcommit, ranks_per_node_cpus=cpus_wanted, cpus_per_node=cpus_there,
        requeue=cluster.requeue, sbatch_args=cluster.sbatch_args,
        workdir_q=q(str(workdir)), run_dir_q=q(str(paths.run_dir(point.name))),
        modules=[q(m) for m in cluster.modules], setup=cluster.setup,
        env=[(name, q(value)) for name, value in cluster.env],
        resume_args=_resume_arguments(spec.train_options),
        overwrite_args=_overwrite_arguments(spec.train_options),
        launcher=cluster.launcher, srun_mpi=cluster.srun_mpi,
        launcher_args=[q(a) for a in cluster.launcher_args],
        hvdcomp=cluster.hvdcomp, train_args=train_args,
    )


def render(spec: SweepSpec, paths: SweepPaths, write: bool = True,
           workdir: "str | Path | None" = None) -> List[RenderedScript]:
    """Render every point; with ``write`` also create the sweep folders and write the scripts
    (``logs/`` must exist before sbatch runs: Slurm does not create it)."""
    cpus = None
    if spec.cluster.overcommit == "auto" and not spec.cluster.cpus_per_node:
        cpus = _partition_cpus(spec.cluster.partition)
    scripts = [RenderedScript(p, paths.script(p.name), render_point(spec, p, paths, cpus, workdir))
               for p in spec.points]
    if write:
        for folder in (paths.scripts, paths.logs, paths.jobs, paths.runs):
            folder.mkdir(parents=True, exist_ok=True)
        for script in scripts:
            atomic_write_text(script.path, script.text, mode=0o777)  # executable, less the umask
    return scripts


# ----------------------------------------------------------------------------------------------
# Job records
# ----------------------------------------------------------------------------------------------

@dataclass
class JobRecord:
    point: str
    job_id: str
    script: str
    run_dir: str
    log: str
    submitted_at: float
    previous_job_ids: List[str]

    @classmethod
    def load(cls, path: Path) -> Optional["JobRecord"]:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a folder in its place, no permission
            raise SlurmError(f"job record {path} is unreadable ({exc.strerror or exc}); "
                             "remove it to resubmit") from None
        except (ValueError, TypeError) as exc:  # not JSON, not UTF-8, other fields
            raise SlurmError(f"job record {path} is unreadable ({exc}); remove it to resubmit") from None


def load_records(spec: SweepSpec, paths: SweepPaths) -> Dict[str, JobRecord]:
    records = {}
    for point in spec.points:
        record = JobRecord.load(paths.record(point.name))
        if record is not None:
            records[point.name] = record
    return records


# ----------------------------------------------------------------------------------------------
# Talking to Slurm
# ----------------------------------------------------------------------------------------------

def _run(cmd: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"{cmd[0]} not found on PATH: run this on a Slurm login node "
                         f"(or load the Slurm module) so that {cmd[0]} is available")
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmRefused(f"{' '.join(cmd)} did not answer within {timeout:.0f} s; "
                         "is slurmctld up (scontrol ping)?") from None


def sbatch(script: Path, extra_args: Sequence[str] = ()) -> str:
    """Submit ``script``; return the job id. Raises SlurmError with Slurm's message."""
    out = _run(["sbatch", "--parsable", *extra_args, str(script)])
    if out.returncode != 0:
        message = (out.stderr.strip() or out.stdout.strip() or f"exit code {out.returncode}")
        raise SlurmRefused(f"sbatch refused {script}: {message}")
    # --parsable prints "jobid" or "jobid;cluster"
    job_id = out.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmRefused(f"sbatch printed no job id for {script}: {out.stdout!r} {out.stderr!r}")
    return job_id


@dataclass
class JobState:
    job_id: str
    state: str          # PENDING, RUNNING, COMPLETED, FAILED, ... or UNKNOWN
    exit_code: Optional[str] = None  # "3:0" (exit status:signal) when known
    reason: str = ""
    source: str = ""    # which command told us


def _squeue_states(job_ids: Sequence[str]) -> Dict[str, JobState]:
    if not job_ids or shutil.which("squeue") is None:
        return {}
    out = _run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"])
    states = {}
    if out.returncode == 0:
        for line in out.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] in job_ids:
                reason = "" if parts[2] in ("None", "(null)") else parts[2]
                states[parts[0]] = JobState(parts[0], parts[1], None, reason, "squeue")
    return states


def _scontrol_state(job_id: str) -> Optional[JobState]:
    if shutil.which("scontrol") is None:
        return None
    out = _run(["scontrol", "show", "job", "-o", job_id])
    if out.returncode != 0:
        return None
    fields = dict(re.findall(r"(\w+)=(\S*)", out.stdout))
    if "JobState" not in fields:
        return None
    reason = fields.get("Reason", "")
    return JobState(job_id, fields["JobState"], fields.get("ExitCode"),
                    "" if reason == "None" else reason, "scontrol")


def _sacct_state(job_id: str) -> Optional[JobState]:
    if shutil.which("sacct") is None:
        return None
    # With slurmdbd: the accounting database; without it, -c reads the job completion log.
    for extra in ([], ["-c"]):
        out = _run(["sacct", *extra, "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"])
        if out.returncode != 0:
            continue
        for line in out.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] == job_id:
                state = parts[1].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
                return JobState(job_id, state, parts[2], "", "sacct" + (" -c" if extra else ""))
    return None


def job_states(job_ids: Sequence[str]) -> Dict[str, JobState]:
    """The state of each job: squeue first, then scontrol for the exit code of finished ones,
    then sacct for jobs the controller has forgotten. Unknown jobs get state UNKNOWN."""
    job_ids = list(dict.fromkeys(job_ids))
    if job_ids and not any(shutil.which(c) for c in ("squeue", "scontrol", "sacct")):
        raise SlurmError("none of squeue, scontrol, sacct is on PATH: run this where Slurm is")
    states = _squeue_states(job_ids)
    for job_id in job_ids:
        known = states.get(job_id)
        if known is not None and known.state not in TERMINAL_STATES:
            continue  # pending/running: squeue says all there is to say
        detail = _scontrol_state(job_id) or _sacct_state(job_id)
        if detail is not None:
            states[job_id] = detail
        elif known is None:
            states[job_id] = JobState(job_id, "UNKNOWN", None, "not known to squeue, scontrol or sacct", "")
    return states


# ----------------------------------------------------------------------------------------------
# Run directories, as far as submit and status need them
# ----------------------------------------------------------------------------------------------

def run_finished(run_dir: Path) -> bool:
    """True when ``summary.json`` says the run completed (docs/design.md, Run directories)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def run_progress(run_dir: Path) -> str:
    if run_finished(run_dir):
        return "completed"
    if (run_dir / "summary.json").exists():
        return "summary unreadable"
    if (run_dir / "metrics.jsonl").exists():
        checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
        return "partial" + (f" ({len(checkpoints)} checkpoints)" if checkpoints else "")
    if (run_dir / "config.json").exists():
        return "started"
    return "-"


# ----------------------------------------------------------------------------------------------
# Submit, status, cancel
# ----------------------------------------------------------------------------------------------

@dataclass
class SubmitOutcome:
    point: str
    action: str         # "submitted", "skipped: finished", "skipped: running", "would submit"
    job_id: Optional[str] = None


def submit(spec: SweepSpec, paths: SweepPaths, dry_run: bool = False,
           sbatch_args: Sequence[str] = (), workdir: "str | Path | None" = None,
           on_outcome=None) -> List[SubmitOutcome]:
    """Render and submit every point that is neither finished nor pending/running.

    Stops at the first refused submission (raising SlurmError): the points before it are
    submitted and recorded, the refused one has no record."""
    scripts = render(spec, paths, write=not dry_run, workdir=workdir)
    records = load_records(spec, paths)
    states = job_states([r.job_id for r in records.values()]) if records else {}
    outcomes = []
    for script in scripts:
        name = script.point.name
        record = records.get(name)
        if run_finished(paths.run_dir(name)):
            outcome = SubmitOutcome(name, "skipped: finished", record.job_id if record else None)
        elif record is not None and states[record.job_id].state not in TERMINAL_STATES | {"UNKNOWN"}:
            outcome = SubmitOutcome(name, f"skipped: {states[record.job_id].state.lower()}", record.job_id)
        elif dry_run:
            outcome = SubmitOutcome(name, "would submit")
        else:
            job_id = sbatch(script.path, sbatch_args)
            previous = (record.previous_job_ids + [record.job_id]) if record else []
            new_record = JobRecord(point=name, job_id=job_id, script=str(script.path),
                                   run_dir=str(paths.run_dir(name)), log=str(paths.log(name, job_id)),
                                   submitted_at=time.time(), previous_job_ids=previous)
            atomic_write_text(paths.record(name), json.dumps(asdict(new_record), indent=2) + "\n")
            outcome = SubmitOutcome(name, "submitted", job_id)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes


@dataclass
class PointStatus:
    point: str
    job_id: Optional[str]
    state: str
    exit_code: Optional[str]
    reason: str
    run: str
    log: Optional[str]
    run_dir: str


def status(spec: SweepSpec, paths: SweepPaths) -> List[PointStatus]:
    records = load_records(spec, paths)
    states = job_states([r.job_id for r in records.values()]) if records else {}
    rows = []
    for point in spec.points:
        record = records.get(point.name)
        run_dir = paths.run_dir(point.name)
        if record is None:
            rows.append(PointStatus(point.name, None, "NOT SUBMITTED", None, "", run_progress(run_dir),
                                    None, str(run_dir)))
            continue
        state = states[record.job_id]
        rows.append(PointStatus(point.name, record.job_id, state.state, state.exit_code,
                                state.reason, run_progress(run_dir), record.log, str(run_dir)))
    return rows


def cancel(spec: SweepSpec, paths: SweepPaths) -> List[str]:
    """scancel every recorded job that is not finished; returns their ids."""
    records = load_records(spec, paths)
    states = job_states([r.job_id for r in records.values()]) if records else {}
    active = [r.job_id for r in records.values()
              if states[r.job_id].state not in TERMINAL_STATES | {"UNKNOWN"}]
    if active:
        out = _run(["scancel", *active])
        if out.returncode != 0:
            raise SlurmRefused(f"scancel {' '.join(active)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return active


def wait(spec: SweepSpec, paths: SweepPaths, timeout: float, poll: float = 1.0) -> List[PointStatus]:
    """Poll until every submitted point's job is in a terminal state (or ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = status(spec, paths)
        if all(r.state in TERMINAL_STATES or r.job_id is None for r in rows):
            return rows
        if time.monotonic() > deadline:
            pending = [f"{r.point}={r.state}" for r in rows if r.state not in TERMINAL_STATES]
            raise SlurmRefused(f"jobs still not finished after {timeout:.0f} s: {', '.join(pending)}")
        time.sleep(poll)

