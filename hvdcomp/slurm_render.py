"""Sweep points as sbatch scripts: the sweep directory's layout (:class:`SweepPaths`), one
script per point (:func:`render`) and one job-array script per group of points that ask for the
same resources (:func:`render_array`, :func:`array_groups`), from the package's Jinja templates
(or ``$HVDCOMP_SLURM_TEMPLATES``).  Submitting them, and their states, is
:mod:`hvdcomp.slurmjobs`.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .atomic import atomic_write_text
from .shipped_files import TEMPLATES_ENV, template_dir
from .slurmquery import SlurmError
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
# Job arrays: points with the same resources
# ----------------------------------------------------------------------------------------------

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


def array_groups(scripts: Sequence[RenderedScript]) -> List[List[RenderedScript]]:
    """Scripts grouped by their resource directives, in the order of their first point."""
    groups: Dict[tuple, List[RenderedScript]] = {}
    for script in scripts:
        groups.setdefault(tuple(_directives(script.text)), []).append(script)
    return list(groups.values())
