"""Engines: the library that carries ``hvdcomp train``'s collectives (``--engine``).

``horovod``
    ``hvd.init()`` from the launcher's environment (``mpirun``, ``srun``, ``horovodrun``, a lone
    process) and :class:`hvdcomp.comm.HorovodCommunicator` over Horovod's global process set.
``torch``
    ``torch.distributed.init_process_group`` (Gloo on CPU, NCCL with ``--device cuda``) and
    :class:`hvdcomp.comm.torchdist.TorchDistCommunicator` over the default group. Rank and world
    size come from the launcher (:func:`rendezvous`):

    ``torchrun``  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
    ``mpirun``    OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK/_LOCAL_SIZE (MPICH: PMI_RANK/PMI_SIZE,
                  MPI_LOCALRANKID/MPI_LOCALNRANKS);
    ``srun``      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_NUM_NODES;
    a lone process: rank 0 of 1 (an in-memory store, no port).

    ``mpirun`` and ``srun`` start no rendezvous of their own: MASTER_ADDR and MASTER_PORT name
    the address where rank 0 listens. On one node (every rank local) MASTER_ADDR defaults to
    127.0.0.1 and MASTER_PORT to a port derived from the job's id (29501-49500: two jobs on one
    machine do not collide unless their ids hash alike; set MASTER_PORT to choose); across
    nodes MASTER_ADDR must be set (the Slurm template sets both), else one error, exit 2.
    ``horovodrun`` starts Horovod's own rendezvous and is refused for the torch engine.

The default engine: ``torch`` under ``torchrun`` (Horovod cannot start there), else ``horovod``
when ``horovod.torch`` imports, else ``torch``. An engine that is asked for but cannot import or
start under this launcher is refused before anything starts (:func:`check_engine`: one error,
exit 2).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .. import stall
from .config import ConfigError

ENGINES = ("horovod", "torch")
#: launchers the torch engine reads rank and world size from
TORCH_LAUNCHERS = ("torchrun", "mpirun", "srun", "single")
PORT_BASE, PORT_SPAN = 29501, 20000


def horovod_problem() -> Optional[str]:
    """Why ``horovod.torch`` cannot be used here, or None."""
    try:
        import horovod.torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a Horovod built against another torch raises anything
        return f"horovod.torch does not import ({type(exc).__name__}: {exc})".splitlines()[0]
    return None


def torch_problem(device: str = "cpu") -> Optional[str]:
    """Why ``torch.distributed`` (and the communicator over it) cannot be used here, or None."""
    import torch.distributed as dist
    if not dist.is_available():
        return "this torch was built without torch.distributed"
    if device == "cuda" and not dist.is_nccl_available():
        return "this torch has no NCCL backend (needed with --device cuda)"
    if device != "cuda" and not dist.is_gloo_available():
        return "this torch has no Gloo backend (needed on CPU)"
    try:
        from hvdcomp.comm.torchdist import TorchDistCommunicator  # noqa: F401
    except ImportError as exc:
        return f"hvdcomp's torch.distributed communicator does not import ({exc})"
    return None


def default_engine(launcher: Dict[str, Any]) -> str:
    """``torch`` under torchrun, else ``horovod`` when it imports, else ``torch``."""
    if launcher["name"] == "torchrun":
        return "torch"
    return "horovod" if horovod_problem() is None else "torch"


def check_engine(engine: str, launcher: Dict[str, Any], device: str = "cpu",
                 env: Optional[Dict[str, str]] = None) -> None:
    """Raise ConfigError when ``engine`` cannot run under ``launcher`` here (before any rank
    starts: the message names the fix)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown --engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "horovod":
        if launcher["name"] == "torchrun":
            raise ConfigError("--engine horovod cannot start under torchrun (Horovod needs mpirun, "
                              "srun or horovodrun): use --engine torch, or launch with mpirun")
        problem = horovod_problem()
        if problem:
            raise ConfigError(f"--engine horovod: {problem}; install Horovod built against this "
                              "torch (scripts/setup.sh) or use --engine torch")
        return
    problem = torch_problem(device)
    if problem:
        raise ConfigError(f"--engine torch: {problem}; use --engine horovod")
    rendezvous(launcher, env)   # raises ConfigError when rank 0's address cannot be known


def usable_engine(requested: Optional[str], launcher: Dict[str, Any]) -> str:
    """``requested`` when it can start under ``launcher`` here, else the default: the engine
    in which ranks that must fail together meet (:func:`.agreement.fail_across_ranks`)."""
    if requested in ENGINES:
        try:
            check_engine(requested, launcher)
            return requested
        except ConfigError:
            pass
    return default_engine(launcher)


@dataclass(frozen=True)
class Rendezvous:
    """Where the torch engine's ranks meet (see the module docstring)."""
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    address: Optional[str]      # None: a lone process, in-memory store
    port: Optional[int]


def rendezvous(launcher: Dict[str, Any], env: Optional[Dict[str, str]] = None) -> Rendezvous:
    """Rank, world size and rank 0's address from the launcher's environment; ConfigError when
    they cannot be known (horovodrun; several nodes without MASTER_ADDR)."""
    env = dict(os.environ if env is None else env)
    name = launcher["name"]
    if name not in TORCH_LAUNCHERS:
        raise ConfigError(f"--engine torch cannot start under {name} (it starts Horovod's own "
                          "rendezvous): launch with torchrun, mpirun or srun, or use --engine "
                          "horovod")
    rank, size = int(launcher["rank"]), int(launcher["world_size"])
    if name == "single":
        return Rendezvous(0, 1, 0, 1, None, None)
    local_rank, local_size, job = _placement(name, env, rank, size)
    address = env.get("MASTER_ADDR")
    if not address:
        if local_size != size:
            raise ConfigError(f"--engine torch under {name} across several nodes needs the "
                              "address of rank 0's node: export MASTER_ADDR=<host of rank 0> "
                              "(and MASTER_PORT) to every rank")
        address = "127.0.0.1"
    port = env.get("MASTER_PORT", "").strip()
    if port and not port.isdigit():
        raise ConfigError(f"MASTER_PORT={port!r}: expected a port number")
    return Rendezvous(rank, size, local_rank, local_size, address,
                      int(port) if port else derived_port(job))


def _placement(name: str, env: Dict[str, str], rank: int, size: int):
    """(local rank, local size, job id) of a torchrun, mpirun or srun rank."""
    def first(*names: str, default: str = "") -> str:
        for key in names:
            if env.get(key, "").strip():
                return env[key].strip()
        return default

    def number(text: str, fallback: int) -> int:
        digits = text.split("(")[0]           # Slurm writes "2(x3)" for 2 tasks on 3 nodes
        return int(digits) if digits.isdigit() else fallback

    if name == "torchrun":
        return (number(first("LOCAL_RANK"), rank), number(first("LOCAL_WORLD_SIZE"), size),
                first("TORCHELASTIC_RUN_ID", default="torchrun"))
    if name == "mpirun":
        job = first("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", default=str(os.getppid()))
        return (number(first("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"), rank),
                number(first("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"), size), job)
    nodes = number(first("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"), 1)
    per_node = number(first("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"), size)
    return (number(first("SLURM_LOCALID"), rank), size if nodes == 1 else per_node,
            f"{first('SLURM_JOB_ID')}.{first('SLURM_STEP_ID')}")


def derived_port(job: str) -> int:
    """A port for rank 0's store, the same on every rank of ``job`` (see the module docstring)."""
    return PORT_BASE + zlib.crc32(job.encode()) % PORT_SPAN


def start(engine: str, launcher: Dict[str, Any], device: str = "cpu"):
    """Start ``engine`` and return its communicator (the world's ranks, every collective of
    :mod:`hvdcomp.comm.base`)."""
    if engine == "horovod":
        from hvdcomp.comm import HorovodCommunicator
        return HorovodCommunicator.start()
    return _start_torch(rendezvous(launcher), device)


def _start_torch(where: Rendezvous, device: str):
    import torch
    import torch.distributed as dist
    from hvdcomp.comm.torchdist import TorchDistCommunicator

    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(where.local_rank % max(1, torch.cuda.device_count()))
        if where.address is None:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            # a rank that never arrives ends the job through the stall guard, not a 30-min wait
            with stall.waiting(f"torch.distributed rendezvous at {where.address}:{where.port}"):
                try:
                    dist.init_process_group(backend, init_method=f"tcp://{where.address}:"
                                            f"{where.port}", rank=where.rank,
                                            world_size=where.world_size)
                except (RuntimeError, ValueError) as exc:
                    raise ConfigError(f"--engine torch: the ranks cannot meet at "
                                      f"{where.address}:{where.port} ({exc}); set MASTER_ADDR / "
                                      "MASTER_PORT to a free port on rank 0's host") from None
    return TorchDistCommunicator()


def stop(comm) -> None:
    """Tear down what :func:`start` started (torch.distributed's process groups), now rather
    than at interpreter exit: the communicator lets go of its groups, the groups are destroyed,
    and Gloo's threads are joined (:func:`~hvdcomp.comm.torchdist.destroy_process_groups`; see
    :meth:`~hvdcomp.comm.torchdist.TorchDistCommunicator.close` for the abort this prevents)."""
    if type(comm).__name__ == "TorchDistCommunicator":
        from hvdcomp.comm.torchdist import destroy_process_groups
        comm.close()
        destroy_process_groups()
