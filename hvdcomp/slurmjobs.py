"""Sweep points as Slurm jobs: submit the rendered sbatch scripts (:mod:`hvdcomp.slurm_render`)
as job arrays, record them, report their status and cancel them.

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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .atomic import atomic_write_text
from .slurm_render import RenderedScript, SweepPaths, array_groups, render, render_array
from .slurmquery import (TERMINAL_STATES, SlurmError, SlurmRefused, active,  # noqa: F401
                         job_states, sbatch, scancel)
from .sweep import SweepSpec


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
    for group in array_groups(to_submit):
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
