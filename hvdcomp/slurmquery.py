"""Talking to Slurm: sbatch, scancel, and the state of jobs from squeue, scontrol and sacct.

Job ids are Slurm's: ``1234`` for a plain job, ``1234_5`` for task 5 of job array 1234.
Queries are retried: a busy or restarting slurmctld answers "Socket timed out" or "Unable to
contact slurm controller" for a moment, and one such answer must not turn a running sweep into
UNKNOWN jobs (the approach of submitit's ``SlurmInfoWatcher``, which re-asks rather than trusts one
failed call). An answer that is an answer ("Invalid job id") is not retried.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .errors import UserError

#: Slurm job states after which a job will not run again by itself.
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}

#: Seconds to wait before each retry of a query that met a transient failure.
RETRY_DELAYS = (1.0, 3.0, 6.0)

#: What slurmctld or the network says when asking again may help.
_TRANSIENT = re.compile(r"socket timed out|unable to contact slurm controller|connection refused|"
                        r"zero bytes were transmitted|resource temporarily unavailable|"
                        r"transport endpoint|try again|communication connection failure", re.I)


class SlurmError(UserError, RuntimeError):
    """Slurm cannot be used from here (a command missing, a job record or template unreadable):
    something the user fixes; ``hvdcomp`` prints the message and exits 2."""


class SlurmRefused(SlurmError):
    """Slurm answered no (sbatch or scancel refused, no answer in time, jobs not finished): the
    message carries what Slurm said; exit code 1, as a failed command rather than bad input."""
    exit_code = 1


def run_command(cmd: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Run one Slurm command once; SlurmError when it is not installed here."""
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"{cmd[0]} not found on PATH: run this on a Slurm login node "
                         f"(or load the Slurm module) so that {cmd[0]} is available")
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmRefused(f"{' '.join(cmd)} did not answer within {timeout:.0f} s; "
                           "is slurmctld up (scontrol ping)?") from None


def query(cmd: Sequence[str], timeout: float = 60,
          delays: Sequence[float] = RETRY_DELAYS) -> subprocess.CompletedProcess:
    """Run a read-only Slurm command, asking again after a timeout or a transient failure; the
    last answer is returned (or its timeout raised) once ``delays`` are used up."""
    for delay in list(delays) + [None]:
        try:
            out = run_command(cmd, timeout)
        except SlurmRefused:
            if delay is None:
                raise
        else:
            if out.returncode == 0 or delay is None or not _TRANSIENT.search(out.stderr):
                return out
        time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def sbatch(script, extra_args: Sequence[str] = ()) -> str:
    """Submit ``script``; return the job id. Raises SlurmRefused with Slurm's message. Not
    retried: a submission that timed out may have gone through."""
    out = run_command(["sbatch", "--parsable", *extra_args, str(script)])
    if out.returncode != 0:
        message = (out.stderr.strip() or out.stdout.strip() or f"exit code {out.returncode}")
        raise SlurmRefused(f"sbatch refused {script}: {message}")
    # --parsable prints "jobid" or "jobid;cluster"
    job_id = out.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmRefused(f"sbatch printed no job id for {script}: {out.stdout!r} {out.stderr!r}")
    return job_id


def scancel(job_ids: Sequence[str]) -> None:
    out = run_command(["scancel", *job_ids])
    if out.returncode != 0:
        raise SlurmRefused(f"scancel {' '.join(job_ids)} failed: "
                           f"{out.stderr.strip() or out.stdout.strip()}")


@dataclass
class JobState:
    job_id: str
    state: str          # PENDING, RUNNING, COMPLETED, FAILED, ... or UNKNOWN
    exit_code: Optional[str] = None  # "3:0" (exit status:signal) when known
    reason: str = ""
    source: str = ""    # which command told us
    restarts: int = 0   # times Slurm requeued the job (scontrol's Restarts)


def _squeue_states(job_ids: Sequence[str]) -> Dict[str, JobState]:
    """Pending and running jobs; ``-r`` lists each array task on its own line. One id squeue
    does not know makes it refuse the whole list, so then each is asked alone."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    out = query(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"])
    if out.returncode != 0:
        if len(job_ids) == 1:
            return {}
        states: Dict[str, JobState] = {}
        for job_id in job_ids:
            states.update(_squeue_states([job_id]))
        return states
    states = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in job_ids:
            reason = "" if parts[2] in ("None", "(null)") else parts[2]
            states[parts[0]] = JobState(parts[0], parts[1], None, reason, "squeue")
    return states


def _scontrol_state(job_id: str) -> Optional[JobState]:
    if shutil.which("scontrol") is None:
        return None
    out = query(["scontrol", "show", "job", "-o", job_id])
    if out.returncode != 0:
        return None
    fields = dict(re.findall(r"(\w+)=(\S*)", out.stdout))
    if "JobState" not in fields:
        return None
    reason = fields.get("Reason", "")
    restarts = fields.get("Restarts", "0")
    return JobState(job_id, fields["JobState"], fields.get("ExitCode"),
                    "" if reason == "None" else reason, "scontrol",
                    int(restarts) if restarts.isdigit() else 0)


def _task_in(task: int, spec: str) -> bool:
    """Whether array task ``task`` is in scontrol's ArrayTaskId ``spec`` ("3", "0-4%2", "1,5-7")."""
    for part in spec.split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (high.isdigit() or not high) and int(low) <= task <= int(high or low):
            return True
    return False


def _array_task_state(job_id: str) -> Optional[JobState]:
    """The state of array task ``A_i`` that scontrol does not know by that name: a task that has
    not started (or was cancelled before it did) lives in the array's own record (JobId=A),
    whose ArrayTaskId lists the tasks it still holds."""
    array_id, _, task_text = job_id.partition("_")
    if not task_text.isdigit() or shutil.which("scontrol") is None:
        return None
    out = query(["scontrol", "show", "job", "-o", array_id])
    if out.returncode != 0:
        return None
    task, records = int(task_text), [dict(re.findall(r"(\w+)=(\S*)", line))
                                     for line in out.stdout.splitlines()]
    records = [r for r in records if r.get("ArrayJobId") == array_id and "JobState" in r]
    exact = [r for r in records if r.get("ArrayTaskId") == task_text]
    held = [r for r in records if _task_in(task, r.get("ArrayTaskId", ""))]
    claimed = {r.get("ArrayTaskId") for r in records}
    meta = [r for r in records if r.get("JobId") == array_id and task_text not in claimed]
    for fields in exact or held or meta:
        reason = fields.get("Reason", "")
        exit_code = fields.get("ExitCode") if exact else None
        return JobState(job_id, fields["JobState"], exit_code,
                        "" if reason == "None" else reason, "scontrol (array)")
    return None


def _sacct_state(job_id: str) -> Optional[JobState]:
    if shutil.which("sacct") is None:
        return None
    # With slurmdbd: the accounting database; without it, -c reads the job completion log
    # (which names array tasks by their own job id, so they are not found there).
    for extra in ([], ["-c"]):
        out = query(["sacct", *extra, "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"])
        if out.returncode != 0:
            continue
        for line in out.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] == job_id:
                state = parts[1].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
                return JobState(job_id, state, parts[2], "", "sacct" + (" -c" if extra else ""))
    return None


def job_states(job_ids: Sequence[str]) -> Dict[str, JobState]:
    """The state of each job: squeue first, then scontrol for the exit code (and restarts) of
    finished ones, then sacct for jobs the controller has forgotten. Unknown jobs get UNKNOWN."""
    job_ids = list(dict.fromkeys(job_ids))
    if job_ids and not any(shutil.which(c) for c in ("squeue", "scontrol", "sacct")):
        raise SlurmError("none of squeue, scontrol, sacct is on PATH: run this where Slurm is")
    states = _squeue_states(job_ids)
    for job_id in job_ids:
        known = states.get(job_id)
        if known is not None and known.state not in TERMINAL_STATES:
            continue  # pending/running: squeue says all there is to say
        detail = (_scontrol_state(job_id) or _array_task_state(job_id)
                  or _sacct_state(job_id))
        if detail is not None:
            states[job_id] = detail
        elif known is None:
            states[job_id] = JobState(job_id, "UNKNOWN", None,
                                      "not known to squeue, scontrol or sacct", "")
    return states


def active(states: Dict[str, JobState]) -> List[str]:
    """The ids of jobs that may still run (neither terminal nor unknown)."""
    return [j for j, s in states.items() if s.state not in TERMINAL_STATES | {"UNKNOWN"}]
