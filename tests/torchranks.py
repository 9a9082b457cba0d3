"""Run a test function in N real ``torch.distributed`` processes (Gloo or NCCL), no Horovod.

    def _body(n):                       # module-level, in a test module
        from hvdcomp.comm.torchdist import TorchDistCommunicator
        comm = TorchDistCommunicator()
        return comm.allreduce(torch.ones(n) * comm.rank, "t", op="sum").tolist()

    def test_allreduce():
        results = run_torch_ranks(_body, np=2, n=3)    # one result per rank

Each rank is a separate Python process started with the environment torchrun gives
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), initialises the
process group from it (``env://``, a TCP store on loopback), imports the test module by path,
runs the function and pickles its result. A rank that fails ends the others at once (they
would wait in a collective for ever); a run past ``timeout`` is killed and fails the test with
every rank's output.
"""
from __future__ import annotations

import inspect
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, List

import pytest

RANK_MAIN = Path(__file__).with_name("_torch_rank_main.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, np: int, port: int) -> dict:
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env.update(RANK=str(rank), WORLD_SIZE=str(np), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(np),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])))
    return env


def _end(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def _wait_all(procs, timeout: float) -> str:
    """'' when every rank exited 0; 'failed' as soon as one fails; 'hung' past the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [proc.poll() for proc in procs]
        if any(code not in (None, 0) for code in codes):
            time.sleep(0.5)  # let the others print what they saw
            return "failed"
        if all(code == 0 for code in codes):
            return ""
        time.sleep(0.05)
    return "hung"


def run_torch_ranks(func: Callable[..., Any], np: int = 2, backend: str = "gloo",
                    timeout: float = 120, **kwargs: Any) -> List[Any]:
    """Run the module-level ``func(**kwargs)`` in ``np`` processes; results in rank order."""
    if func.__qualname__ != func.__name__:
        raise ValueError(f"{func.__qualname__} must be a module-level function")
    with tempfile.TemporaryDirectory(prefix="hvdcomp-torchranks-") as tmp:
        job = Path(tmp, "job.pkl")
        job.write_bytes(pickle.dumps({"file": inspect.getfile(func), "func": func.__name__,
                                      "kwargs": kwargs, "backend": backend}))
        port = free_port()
        logs = [open(Path(tmp, f"rank{r}.log"), "w+") for r in range(np)]
        procs = [subprocess.Popen([sys.executable, str(RANK_MAIN), str(job)],
                                  env=rank_env(r, np, port), stdout=logs[r],
                                  stderr=subprocess.STDOUT, start_new_session=True)
                 for r in range(np)]
        try:
            outcome = _wait_all(procs, timeout)
        finally:
            _end(procs)
        output = "".join(f"--- rank {r} ---\n{Path(tmp, f'rank{r}.log').read_text()}"
                         for r in range(np))
        for log in logs:
            log.close()
        if outcome == "hung":
            pytest.fail(f"ranks hung: killed after {timeout:.0f} s\n{output}", pytrace=False)
        if outcome:
            pytest.fail(f"{func.__name__} failed on {np} {backend} ranks:\n{output}",
                        pytrace=False)
        return [pickle.loads(Path(tmp, f"result{r}.pkl").read_bytes()) for r in range(np)]
