"""Run a test function in N real Horovod ranks, launched with ``mpirun`` or Horovod's Gloo launcher.

    def _body(n):                      # module-level, in a test module
        import horovod.torch as hvd
        return hvd.allreduce(torch.ones(n) * hvd.rank(), op=hvd.Sum).tolist()

    def test_allreduce():
        results = run_ranks(_body, np=2, controller="mpi", n=3)   # one result per rank

Each rank imports the test module by its file path, calls ``hvd.init()``, runs the function and
pickles its return value into a temporary directory; the parent collects them in rank order. A rank
that raises, exits early or hangs past ``timeout`` fails the test with every rank's output, and the
whole process group of the launcher is killed, so no rank outlives the test.
"""
from __future__ import annotations

import inspect
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, List

import pytest

RANK_MAIN = Path(__file__).with_name("_rank_main.py")


def mpirun_available() -> bool:
    return shutil.which("mpirun") is not None


def horovod_built(controller: str) -> bool:
    try:
        import horovod.torch as hvd
    except Exception:
        return False
    return bool(hvd.mpi_built() if controller == "mpi" else hvd.gloo_built())


def require(controller: str) -> None:
    """Skip (with the reason) when this machine cannot start ranks for ``controller``."""
    if controller == "mpi" and not mpirun_available():
        pytest.skip("mpirun not on PATH: run scripts/setup.sh (installs Open MPI)")
    if not horovod_built(controller):
        pytest.skip(f"Horovod with {controller} not importable: run scripts/setup.sh")


def launcher_env() -> dict:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               # Loopback TCP only: no InfiniBand probing, no warnings about missing devices.
               OMPI_MCA_btl="self,tcp", OMPI_MCA_btl_tcp_if_include="lo",
               OMPI_MCA_oob_tcp_if_include="lo", OMPI_MCA_pml="ob1",
               OMPI_MCA_btl_base_warn_component_unused="0",
               # ranks share 2 cores: one intra-op thread each avoids oversubscription stalls
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONUNBUFFERED="1",
               HOROVOD_LOG_LEVEL=os.environ.get("HOROVOD_LOG_LEVEL", "warning"))
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    return env


def launch_command(np: int, controller: str, argv: List[str]) -> List[str]:
    if controller == "mpi":
        return ["mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none", *argv]
    if controller == "gloo":
        horovodrun = Path(sys.executable).with_name("horovodrun")
        # Gloo's own timeout (30 s by default) ended a 3-rank parity run on this 2-core machine
        # once ("Application timeout caused pair closure", 30 Nov 2026; it passed when rerun);
        # a real hang is still ended by run_ranks' timeout and hvdcomp's stall guard
        return [str(horovodrun), "--gloo", "--gloo-timeout-seconds", "120", "-np", str(np),
                "-H", f"localhost:{np}", *argv]
    raise ValueError(f"controller must be 'mpi' or 'gloo', not {controller!r}")


def run_command(cmd: List[str], timeout: float,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or launcher_env(), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        pytest.fail(f"ranks hung: killed after {timeout:.0f} s\n$ {' '.join(cmd)}\n{out}",
                    pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_ranks(func: Callable[..., Any], np: int = 2, controller: str = "mpi", timeout: float = 120,
              **kwargs: Any) -> List[Any]:
    """Run the module-level ``func(**kwargs)`` in ``np`` real Horovod ranks; results by rank."""
    require(controller)
    if func.__qualname__ != func.__name__:
        raise ValueError(f"{func.__qualname__} must be a module-level function")
    with tempfile.TemporaryDirectory(prefix="hvdcomp-ranks-") as tmp:
        job = Path(tmp, "job.pkl")
        job.write_bytes(pickle.dumps({"file": inspect.getfile(func), "func": func.__name__,
                                      "kwargs": kwargs, "controller": controller}))
        argv = [sys.executable, str(RANK_MAIN), str(job)]
        done = run_command(launch_command(np, controller, argv), timeout)
        results = []
        for rank in range(np):
            path = Path(tmp, f"rank{rank}.pkl")
            if done.returncode != 0 or not path.exists():
                pytest.fail(f"{func.__name__} failed on {np} ranks ({controller}), exit code "
                            f"{done.returncode}:\n{done.stdout}", pytrace=False)
            results.append(pickle.loads(path.read_bytes()))
        return results
