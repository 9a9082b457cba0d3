"""Sweep points as Slurm jobs: render sbatch scripts, submit them as job arrays, their status.

The sweep directory (``[sweep] output`` of the spec, or ``--out``) holds everything::

    OUTPUT/
      scripts/<point>.sbatch     one script per point, deterministic names (render)
      scripts/array-<hash>.sbatch  one job array per group of points with the same resources
      logs/<array>_<task>.out    Slurm's output of each job (appended across requeues), linked
                                 from logs/<point>.<array>_<task>.out
      jobs/<point>.json          the job record: job id, script, times, earlier job ids (submit)
      jobs/<point>.exit/         each rank's exit code, for the job's (srun)
      runs/<point>/              the run directory ``hvdcomp train --out`` writes (docs/design.md)

A job record is written atomically (temporary file + ``os.replace``) and only after ``sbatch``
printed a job id, so a missing ``sbatch`` or a rejected submission never leaves half a record.
States come from :mod:`hvdcomp.slurmquery`; :mod:`hvdcomp.slurmwait` waits for them.
"""
from __future__ import annotations

import hashlib
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
from .shipped_files import TEMPLATES_ENV, template_dir
from .slurmquery import (TERMINAL_STATES, SlurmError, SlurmRefused, active,  # noqa: F401
                         job_states, sbatch, scancel)
from .sweep import SweepPoint, SweepSpec, TrainOptions, train_arguments

TEMPLATE_NAME = "job.sbatch.j2"
ARRAY_TEMPLATE_NAME = "array.sbatch.j2"


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

    def exit_codes(self, point: str) -> Path:
        return self.jobs / f"{point}.exit"


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


def _template(name: str = TEMPLATE_NAME):
    """A template from the package (or from ``$HVDCOMP_SLURM_TEMPLATES`` when set)."""
    try:
        import jinja2
    except ImportError:  # pragma: no cover - jinja2 is a dependency
        raise SlurmError("rendering sbatch scripts needs jinja2: pip install jinja2") from None
    folder = template_dir()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    try:
        return env.get_template(name)
    except jinja2.TemplateNotFound:
        where = (f"in {folder} (${TEMPLATES_ENV})" if os.environ.get(TEMPLATES_ENV)
                 else f"in the installed package ({folder}); reinstall hvdcomp or set "
                      f"{TEMPLATES_ENV} to a folder that holds it")
        raise SlurmError(f"sbatch template {name} not found {where}") from None


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
        requeue=cluster.requeue, requeue_warning=cluster.requeue_warning,
        max_requeues=cluster.max_requeues, sbatch_args=cluster.sbatch_args,
        exit_dir_q=q(str(paths.exit_codes(point.name))),
        workdir_q=q(str(workdir)), run_dir_q=q(str(paths.run_dir(point.name))),
        modules=[q(m) for m in cluster.modules], setup=cluster.setup,
        env=[(name, q(value)) for name, value in cluster.env],
        resume_args=_resume_arguments(spec.train_options),
        overwrite_args=_overwrite_arguments(spec.train_options),
        launcher=cluster.launcher, srun_mpi=cluster.srun_mpi,
        launcher_args=[q(a) for a in cluster.launcher_args],
        hvdcomp=cluster.hvdcomp, train_args=train_args,
        # torch.distributed needs rank 0's address, which srun and mpirun do not give
        torch_engine=point.options.get("engine") == "torch",
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
        try:
            for folder in (paths.scripts, paths.logs, paths.jobs, paths.runs):
                folder.mkdir(parents=True, exist_ok=True)
            for script in scripts:
                atomic_write_text(script.path, script.text, mode=0o777)  # executable, less umask
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise SlurmError(f"cannot write the sweep directory {paths.root}: "
                             f"{exc.strerror or exc}{where}; choose another --out") from None
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
    array_script: str = ""   # the job array script that submitted it (empty: a single job)

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
            raise SlurmError(f"job record {path} is unreadable ({exc}); "
                             "remove it to resubmit") from None


def load_records(spec: SweepSpec, paths: SweepPaths) -> Dict[str, JobRecord]:
    records = {}
    for point in spec.points:
        record = JobRecord.load(paths.record(point.name))
        if record is not None:
            records[point.name] = record
    return records


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
# Submit (as job arrays), status, cancel
# ----------------------------------------------------------------------------------------------

@dataclass
class SubmitOutcome:
    point: str
    action: str         # "submitted", "skipped: finished", "skipped: running", "would submit"
    job_id: Optional[str] = None


def _directives(text: str) -> List[str]:
    """A point script's ``#SBATCH`` lines that ask for resources (all but its name and output):
    points with the same ones can be tasks of one job array."""
    return [line for line in text.splitlines() if line.startswith("#SBATCH ")
            and not line.startswith(("#SBATCH --job-name=", "#SBATCH --output="))]


def render_array(spec: SweepSpec, paths: SweepPaths, scripts: Sequence[RenderedScript],
                 max_concurrent: Optional[int]) -> str:
    """The job array script whose task i runs ``scripts[i]`` (``sbatch --array=0-N%K``)."""
    last = len(scripts) - 1
    array = ("0" if last == 0 else f"0-{last}") + (f"%{max_concurrent}" if max_concurrent else "")
    return _template(ARRAY_TEMPLATE_NAME).render(
        sweep_name=spec.name, spec_path=str(spec.path), job_name=spec.name,
        log_pattern=str(paths.logs / "%A_%a.out"), array=array,
        max_concurrent=max_concurrent, directives=_directives(scripts[0].text),
        points=[shlex.quote(s.point.name) for s in scripts], scripts_dir=str(paths.scripts),
        scripts_q=shlex.quote(str(paths.scripts)))


def _array_groups(scripts: Sequence[RenderedScript]) -> List[List[RenderedScript]]:
    """Scripts grouped by their resource directives, in the order of their first point."""
    groups: Dict[tuple, List[RenderedScript]] = {}
    for script in scripts:
        groups.setdefault(tuple(_directives(script.text)), []).append(script)
    return list(groups.values())


def _write_record(paths: SweepPaths, record: JobRecord) -> None:
    try:
        atomic_write_text(paths.record(record.point), json.dumps(asdict(record), indent=2) + "\n")
    except OSError as exc:  # the job is queued: say which, so it can be cancelled
        raise SlurmError(f"{record.point}: job {record.job_id} was submitted but its record "
                         f"{paths.record(record.point)} could not be written "
                         f"({exc.strerror or exc}); `scancel {record.job_id}` or keep it, "
                         "and free the disk before submitting again") from None


def _submit_array(spec: SweepSpec, paths: SweepPaths, group: Sequence[RenderedScript],
                  records: Dict[str, JobRecord], sbatch_args: Sequence[str],
                  max_concurrent: Optional[int]) -> List[SubmitOutcome]:
    """sbatch one job array for ``group``; record each point as task ``<array>_<i>`` and link
    its output file under the point's name."""
    text = render_array(spec, paths, group, max_concurrent)
    array_script = paths.scripts / f"array-{hashlib.sha1(text.encode()).hexdigest()[:10]}.sbatch"
    try:
        atomic_write_text(array_script, text, mode=0o777)
    except OSError as exc:
        raise SlurmError(f"cannot write {array_script}: {exc.strerror or exc}") from None
    array_id = sbatch(array_script, sbatch_args)
    outcomes = []
    for index, script in enumerate(group):
        name, job_id = script.point.name, f"{array_id}_{index}"
        log = paths.log(name, job_id)
        try:
            log.unlink(missing_ok=True)
            log.symlink_to(f"{job_id}.out")  # Slurm writes logs/<array>_<task>.out
        except OSError:
            log = paths.logs / f"{job_id}.out"  # no links here: the record names Slurm's file
        old = records.get(name)
        _write_record(paths, JobRecord(
            point=name, job_id=job_id, script=str(script.path), run_dir=str(paths.run_dir(name)),
            log=str(log), submitted_at=time.time(),
            previous_job_ids=(old.previous_job_ids + [old.job_id]) if old else [],
            array_script=str(array_script)))
        outcomes.append(SubmitOutcome(name, "submitted", job_id))
    return outcomes


def submit(spec: SweepSpec, paths: SweepPaths, dry_run: bool = False,
           sbatch_args: Sequence[str] = (), workdir: "str | Path | None" = None,
           on_outcome=None, max_concurrent: Optional[int] = None) -> List[SubmitOutcome]:
    """Render, then submit every point that is neither finished nor pending/running, as one
    job array per group of points with the same resources, at most ``max_concurrent`` (default:
    the spec's ``max-concurrent``) of each array running at once.

    Stops at the first refused submission (raising SlurmError): the arrays before it are
    submitted and recorded, the refused one's points have no new record."""
    report = on_outcome or (lambda outcome: None)
    max_concurrent = max_concurrent or spec.cluster.max_concurrent
    scripts = render(spec, paths, write=not dry_run, workdir=workdir)
    records = load_records(spec, paths)
    states = job_states([r.job_id for r in records.values()]) if records else {}
    outcomes, to_submit = [], []
    for script in scripts:
        name = script.point.name
        record = records.get(name)
        if run_finished(paths.run_dir(name)):
            outcome = SubmitOutcome(name, "skipped: finished", record.job_id if record else None)
        elif record is not None and record.job_id in active(states):
            state = states[record.job_id].state.lower()
            outcome = SubmitOutcome(name, f"skipped: {state}", record.job_id)
        elif dry_run:
            outcome = SubmitOutcome(name, "would submit")
        else:
            to_submit.append(script)
            continue
        outcomes.append(outcome)
        report(outcome)
    for group in _array_groups(to_submit):
        for outcome in _submit_array(spec, paths, group, records, sbatch_args, max_concurrent):
            outcomes.append(outcome)
            report(outcome)
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
            rows.append(PointStatus(point.name, None, "NOT SUBMITTED", None, "",
                                    run_progress(run_dir), None, str(run_dir)))
            continue
        state = states[record.job_id]
        rows.append(PointStatus(point.name, record.job_id, state.state, state.exit_code,
                                state.reason, run_progress(run_dir), record.log, str(run_dir)))
    return rows


def cancel(spec: SweepSpec, paths: SweepPaths) -> List[str]:
    """scancel every recorded job that is not finished; returns their ids."""
    records = load_records(spec, paths)
    states = job_states([r.job_id for r in records.values()]) if records else {}
    running = active(states)
    if running:
        scancel(running)
    return running
