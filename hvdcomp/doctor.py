"""``hvdcomp doctor``: what this environment has, and whether real ranks can talk on each engine.

Both engines of ``hvdcomp train --engine`` are reported: Horovod (its build, 2 ranks over MPI and
over Gloo) and torch.distributed (its backends, 2 ranks under ``torchrun`` meeting through
hvdcomp's own engine start and allreducing through its communicator).

Each check is a :class:`Check` with a status and, when it fails, the command that fixes it. The
facts also go into every run directory (``env.json``) through :func:`collect_facts`.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

SETUP_HINT = "run scripts/setup.sh from the hvdcomp repository"
MPI_HINT = ("install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev; "
            "on a cluster: module load openmpi), then re-run scripts/setup.sh")


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _version(module: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:
        return None


def _import_error(module: str) -> str:
    try:
        importlib.import_module(module)
        return ""
    except Exception as exc:  # torchvision raises RuntimeError, not ImportError
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


def mpi_facts() -> Dict[str, Any]:
    mpirun = shutil.which("mpirun")
    facts: Dict[str, Any] = {"mpirun": mpirun, "implementation": None, "version": None}
    if mpirun:
        try:
            out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
            first = (out.stdout or out.stderr).strip().splitlines()[0]
            facts["version_line"] = first
            if "Open MPI" in first or "OpenRTE" in first:
                facts["implementation"] = "Open MPI"
            elif "HYDRA" in (out.stdout + out.stderr) or "MPICH" in first:
                facts["implementation"] = "MPICH"
            facts["version"] = first.split()[-1]
        except Exception as exc:  # a broken mpirun is a finding, not a crash
            facts["error"] = str(exc)
    return facts


def horovod_facts() -> Dict[str, Any]:
    facts: Dict[str, Any] = {"version": None}
    try:
        import horovod
        import horovod.torch as hvd
    except Exception as exc:
        facts["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return facts
    facts["version"] = horovod.__version__
    facts["controllers"] = {"mpi": hvd.mpi_built(), "gloo": hvd.gloo_built()}
    facts["tensor_operations"] = {"nccl": hvd.nccl_built(), "ddl": hvd.ddl_built(),
                                  "ccl": hvd.ccl_built(), "mpi": hvd.mpi_built(),
                                  "gloo": hvd.gloo_built()}
    facts["cuda_built"] = hvd.cuda_built()
    return facts


def torch_facts() -> Dict[str, Any]:
    try:
        import torch
        import torch.distributed as dist
    except Exception as exc:
        return {"version": None, "error": str(exc)}
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    backends = {"gloo": dist.is_available() and dist.is_gloo_available(),
                "nccl": dist.is_available() and dist.is_nccl_available(),
                "mpi": dist.is_available() and dist.is_mpi_available()}
    return {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_devices": devices,
            "distributed": dist.is_available(), "distributed_backends": backends}


def engine_facts() -> Dict[str, Any]:
    """Which ``--engine`` can run here, and the default under a plain launcher (mpirun)."""
    from hvdcomp.train.engine import default_engine, horovod_problem, torch_problem
    problems = {"horovod": horovod_problem(), "torch": torch_problem()}
    return {"usable": [name for name, problem in problems.items() if problem is None],
            "problems": {name: problem for name, problem in problems.items() if problem},
            "default": default_engine({"name": "mpirun"}),
            "default_under_torchrun": default_engine({"name": "torchrun"})}


def collect_facts() -> Dict[str, Any]:
    """Versions and build facts (no ranks started); cheap enough for every run directory."""
    mpi4py_version = _version("mpi4py")
    mpi_library = None
    if mpi4py_version:
        try:
            import mpi4py
            # Reading the library version needs no MPI_Init; initialising would start a singleton
            # MPI job, which aborts the whole process where Open MPI's helpers are missing.
            mpi4py.rc.initialize = False
            mpi4py.rc.finalize = False
            from mpi4py import MPI
            mpi_library = MPI.Get_library_version().strip().splitlines()[0]
        except Exception as exc:
            mpi_library = f"error: {exc}"
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch_facts(),
        "torchvision": _version("torchvision") if not _import_error("torchvision") else None,
        "horovod": horovod_facts(),
        "engines": engine_facts(),
        "mpi": mpi_facts(),
        "mpi4py": {"version": mpi4py_version, "library": mpi_library},
        "cpus": os.cpu_count(),
    }


SMOKE = """
import horovod.torch as hvd, torch
hvd.init()
total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum, name="doctor.smoke")
expected = hvd.size() * (hvd.size() + 1) / 2
assert total.item() == expected, (total.item(), expected)
print(f"rank {hvd.rank()}/{hvd.size()} ok", flush=True)
"""


SMOKE_TORCH = """
import torch
from hvdcomp.train.config import detect_launcher
from hvdcomp.train.engine import start, stop
comm = start("torch", detect_launcher())
total = comm.allreduce(torch.tensor([float(comm.rank + 1)]), "doctor.smoke", op="sum")
expected = comm.size * (comm.size + 1) / 2
assert total.item() == expected, (total.item(), expected)
print(f"rank {comm.rank}/{comm.size} ok", flush=True)
stop(comm)
"""


def launcher_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def smoke_ranks(controller: str, np: int = 2, timeout: float = 90) -> Check:
    """Start ``np`` ranks that must reach each other through a Horovod allreduce."""
    name = f"{np} ranks over {controller}"
    if controller == "torch":
        name = f"{np} ranks over torch.distributed (torchrun, Gloo)"
        torchrun = Path(sys.executable).with_name("torchrun")
        if not torchrun.exists():
            return Check(name, False, f"{torchrun} not found", SETUP_HINT)
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(np), "--no-python",
               sys.executable, "-c", SMOKE_TORCH]
    elif controller == "mpi":
        mpirun = shutil.which("mpirun")
        if not mpirun:
            return Check(name, False, "mpirun not found on PATH", MPI_HINT)
        cmd = [mpirun, "-np", str(np), "--oversubscribe", sys.executable, "-c", SMOKE]
    else:
        horovodrun = Path(sys.executable).with_name("horovodrun")
        if not horovodrun.exists():
            return Check(name, False, f"{horovodrun} not found", SETUP_HINT)
        cmd = [str(horovodrun), "--gloo", "-np", str(np), "-H", f"localhost:{np}",
               sys.executable, "-c", SMOKE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=launcher_env(), start_new_session=True)
    except subprocess.TimeoutExpired:
        return Check(name, False, f"ranks did not finish within {timeout:.0f} s (hung)",
                     "check that loopback TCP works and no firewall blocks it; " + SETUP_HINT)
    oks = proc.stdout.count(" ok")
    if proc.returncode == 0 and oks == np:
        through = "hvdcomp's torch engine" if controller == "torch" else "Horovod"
        return Check(name, True, f"{np} ranks allreduced through {through}")
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
    return Check(name, False, f"exit code {proc.returncode}: " + " | ".join(tail), SETUP_HINT)


def run_checks(ranks: bool = True) -> (List[Check], Dict[str, Any]):
    facts = collect_facts()
    checks: List[Check] = []
    tf = facts["torch"]
    checks.append(Check("torch", tf["version"] is not None,
                        tf["version"] or tf.get("error", "missing"), SETUP_HINT))
    mf = facts["mpi"]
    checks.append(Check("MPI", mf["mpirun"] is not None,
                        mf.get("version_line") or "mpirun not found on PATH", MPI_HINT))
    checks.append(Check("mpi4py", facts["mpi4py"]["version"] is not None,
                        f"{facts['mpi4py']['version']} ({facts['mpi4py']['library']})"
                        if facts["mpi4py"]["version"] else "not importable", SETUP_HINT))
    hf = facts["horovod"]
    if hf["version"] is None:
        checks.append(Check("Horovod", False, hf.get("error", "not importable"), SETUP_HINT))
    else:
        ctl = hf["controllers"]
        ops = ", ".join(k for k, v in hf["tensor_operations"].items() if v)
        checks.append(Check("Horovod", ctl["mpi"] and ctl["gloo"],
                            f"{hf['version']}: controllers "
                            + ", ".join(k for k, v in ctl.items() if v) + f"; tensor ops {ops}",
                            "rebuild Horovod with HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1: "
                            + SETUP_HINT))
    checks.append(_engines_check(facts["engines"]))
    gpus = tf.get("cuda_devices") or []
    checks.append(Check("CUDA devices", True, ", ".join(gpus) if gpus else "none (CPU only)"))
    if ranks and hf["version"] is not None:
        checks.append(smoke_ranks("mpi"))
        checks.append(smoke_ranks("gloo"))
    elif ranks:
        checks.append(Check("2 ranks", False, "not tried: Horovod is missing", SETUP_HINT))
    if ranks and "torch" in facts["engines"]["usable"]:
        checks.append(smoke_ranks("torch"))
    return checks, facts


def _engines_check(engines: Dict[str, Any]) -> Check:
    """One line for ``hvdcomp train --engine``: which engines can run, the default, and why not."""
    usable = engines["usable"]
    why_not = "; ".join(f"{name}: {problem}" for name, problem in engines["problems"].items())
    detail = (f"usable: {', '.join(usable) or 'none'}; default {engines['default']} "
              f"({engines['default_under_torchrun']} under torchrun)"
              + (f"; not usable: {why_not}" if why_not else ""))
    return Check("train engines", bool(usable), detail, SETUP_HINT)
