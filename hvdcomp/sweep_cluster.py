"""The ``[cluster]`` table of a sweep spec: where and how each point's job runs (docs/slurm.md
lists every key). Each key has a check that returns the value or raises ValueError saying what
was expected; :mod:`hvdcomp.sweep` adds the file, line and key."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

_TIME = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LAUNCHERS = ("srun", "mpirun")


@dataclass(frozen=True)
class ClusterSettings:
    """The ``[cluster]`` table: where and how each point's job runs."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "01:00:00"
    nodes: Optional[int] = None            # None: ceil(ranks / tasks-per-node)
    tasks_per_node: Optional[int] = None   # None: ceil(ranks / nodes)
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    gpu_bind: str = "local-rank"           # one GPU per rank; or any `srun --gpu-bind` value
    mem: Optional[str] = None
    cpus_per_node: Optional[int] = None    # for overcommit = "auto"; else asked of sinfo
    overcommit: Any = "auto"               # True, False or "auto"
    launcher: str = "srun"                 # "srun" (srun --mpi=<srun-mpi>) or "mpirun"
    srun_mpi: str = "pmix"
    launcher_args: Tuple[str, ...] = ()    # extra arguments to srun / mpirun
    modules: Tuple[str, ...] = ()          # `module load` each, in order
    setup: Tuple[str, ...] = ()            # shell lines run before the launch
    env: Tuple[Tuple[str, str], ...] = ()  # exported, sorted by name
    requeue: bool = True                   # requeue on preemption and before the time limit
    requeue_warning: int = 60              # seconds before the time limit Slurm warns the job
    max_requeues: int = 5                  # requeues before the time limit, per job
    max_concurrent: Optional[int] = None   # array tasks running at once (sbatch --array=...%K)
    sbatch_args: Tuple[str, ...] = ()      # extra "#SBATCH" options, e.g. "--constraint=a100"
    hvdcomp: str = "hvdcomp"               # how to call hvdcomp inside the job
    workdir: Optional[str] = None          # directory the job runs in; None: where you render
    data_local: bool = False               # data-dir folders are visible where you render too:
                                           # render checks they hold the dataset's files

    def layout(self, ranks: int) -> Tuple[int, int]:
        """(nodes, tasks per node) for ``ranks`` processes."""
        if self.nodes and self.tasks_per_node:
            return self.nodes, self.tasks_per_node
        if self.tasks_per_node:
            return math.ceil(ranks / self.tasks_per_node), self.tasks_per_node
        nodes = self.nodes or 1
        return nodes, math.ceil(ranks / nodes)


# key -> (attribute, check(value) -> converted value or raise ValueError with the expectation)
def _is(kind, what):
    def check(value):
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise ValueError(f"expected {what}, got {type(value).__name__} {value!r}")
        return value
    return check


def _positive_int(value):
    _is(int, "a positive integer")(value)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(value):
    _is(int, "an integer >= 0")(value)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {value}")
    return value


def _string_list(value):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _time(value):
    _is(str, 'a Slurm time such as "01:30:00" or "1-00:00:00"')(value)
    if not _TIME.match(value):
        raise ValueError(f'expected a Slurm time such as "01:30:00" or "1-00:00:00", got {value!r}')
    return value


def time_seconds(value: str) -> int:
    """Seconds in a Slurm time (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``), as sbatch reads them."""
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # after a day count the first field is hours
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 1:  # minutes alone
        hours, minutes, seconds = 0, parts[0], 0
    else:
        hours, minutes, seconds = ([0] + parts)[-3:]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def _launcher(value):
    if value not in LAUNCHERS:
        raise ValueError(f"expected one of {', '.join(map(repr, LAUNCHERS))}, got {value!r}")
    return value


def _overcommit(value):
    if value is True or value is False or value == "auto":
        return value
    raise ValueError(f'expected true, false or "auto", got {value!r}')


_CLUSTER_KEYS: Dict[str, Tuple[str, Callable[[Any], Any]]] = {
    "partition": ("partition", _is(str, "a string")),
    "account": ("account", _is(str, "a string")),
    "qos": ("qos", _is(str, "a string")),
    "time": ("time", _time),
    "nodes": ("nodes", _positive_int),
    "tasks-per-node": ("tasks_per_node", _positive_int),
    "cpus-per-task": ("cpus_per_task", _positive_int),
    "gpus-per-node": ("gpus_per_node", _non_negative_int),
    "gpu-bind": ("gpu_bind", _is(str, "a string")),
    "mem": ("mem", _is(str, 'a string such as "16G"')),
    "cpus-per-node": ("cpus_per_node", _positive_int),
    "overcommit": ("overcommit", _overcommit),
    "launcher": ("launcher", _launcher),
    "srun-mpi": ("srun_mpi", _is(str, 'a string such as "pmix"')),
    "launcher-args": ("launcher_args", _string_list),
    "modules": ("modules", _string_list),
    "setup": ("setup", _string_list),
    "env": ("env", None),  # a table, checked on its own
    "requeue": ("requeue", _is(bool, "true or false")),
    "requeue-warning": ("requeue_warning", _positive_int),
    "max-requeues": ("max_requeues", _non_negative_int),
    "max-concurrent": ("max_concurrent", _positive_int),
    "sbatch-args": ("sbatch_args", _string_list),
    "hvdcomp": ("hvdcomp", _is(str, "a command such as \"hvdcomp\"")),
    "workdir": ("workdir", _is(str, "a directory")),
    "data-local": ("data_local", _is(bool, "true or false")),
}
