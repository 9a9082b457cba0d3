"""``hvdcomp bench train`` as a launcher: every row in its own N rank processes, one row after the
other, on this machine (``mpirun -np N``) or across the ``--link`` emulated link (2 namespaces,
:class:`hvdcomp.netns.EmulatedLink`, built once for the whole run).

``mpirun`` only starts the processes: the compute-only row's ranks never initialise MPI (they
import no communication library), the DDP rows build their own Gloo/NCCL process group over TCP
at rank 0's address, and the Horovod rows call ``hvd.init()``. Each rank writes its record to a
temporary folder (the ranks of one machine, or of its two namespaces, share the file system);
:func:`hvdcomp.bench.train.combine` makes the rows. A row that fails or passes ``row_timeout_s``
is reported in ``failed_rows`` with the end of its ranks' output, and the other rows go on (the
rows measured are kept; ``bench train`` then exits 1); only a failed compute-only row, which
every ratio is over, stops the run.  Ctrl-C or SIGTERM end the ranks and remove the link.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from ..horovod_settings import settings_in_force, with_bench_defaults
from .output import BenchError
from .train import TrainMethod, TrainResult, add_ratios, combine

#: rank 0's TCP port for the DDP rows on the emulated link (its namespace is this run's own)
LINK_MASTER_PORT = 29500
#: variables every rank needs; passed explicitly (-x) across the link when set
RANK_VARIABLES = ("OMP_NUM_THREADS", "PYTHONUNBUFFERED", "PYTHONPATH", "HOROVOD_LOG_LEVEL",
                  "HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "HVDCOMP_STALL_TIMEOUT",
                  "HVDCOMP_BENCH_CRASH_KINDS")


def rank_environment(np: int, base: Optional[Dict[str, str]] = None):
    """(environment of the ranks, the Horovod defaults the bench added): one intra-op thread
    share per rank, hvdcomp importable, the bench's Horovod defaults where the user set none."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // np)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HOROVOD_LOG_LEVEL", "warning")
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if os.geteuid() == 0:   # mpirun refuses root unless told; the bench's ranks are its own
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return with_bench_defaults(env)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Ranks:
    """How this run starts N processes: ``mpirun`` here, or across an emulated link."""

    def __init__(self, np: int, env: Dict[str, str], link=None):
        self.np, self.link = np, link
        self.env = link.environment(env) if link is not None else env
        self.master_addr = link.addresses[0] if link is not None else "127.0.0.1"
        self.master_port = LINK_MASTER_PORT if link is not None else _free_port()
        self.gloo_ifname = "mpi0" if link is not None else "lo"

    def command(self, argv: Sequence[str]) -> List[str]:
        exported = [flag for name in RANK_VARIABLES if name in self.env for flag in ("-x", name)]
        if self.link is not None:
            return self.link.mpirun_command([*exported, *argv])
        return ["mpirun", "-np", str(self.np), "--oversubscribe", "--bind-to", "none",
                "--mca", "btl_base_warn_component_unused", "0", *exported, *argv]


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=5)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_row(ranks: Ranks, method: TrainMethod, spec: Dict[str, object], folder: Path,
            tag: str, timeout_s: float) -> List[Dict[str, object]]:
    """Start the row's N ranks, wait, and return their records (BenchError with the ranks'
    output if one fails, or if the row runs past ``timeout_s``)."""
    spec = {**spec, "kind": method.kind, "algorithm": method.algorithm, "up": method.up,
            "hook": method.hook, "powersgd_rank": method.powersgd_rank, "tag": tag,
            "out_dir": str(folder), "master_addr": ranks.master_addr,
            "master_port": ranks.master_port, "gloo_ifname": ranks.gloo_ifname}
    spec_file = folder / f"{tag}.spec.json"
    spec_file.write_text(json.dumps(spec))
    argv = [sys.executable, "-m", "hvdcomp.bench.train_worker", str(spec_file)]
    proc = subprocess.Popen(ranks.command(argv), env=ranks.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise BenchError(f"row {method.label} ran past {timeout_s:g} s (--row-timeout); its "
                         "ranks were stopped") from None
    finally:
        if proc.poll() is None:
            _stop(proc)
    records = [folder / f"{tag}.rank{r}.json" for r in range(ranks.np)]
    if proc.returncode != 0 or not all(path.exists() for path in records):
        tail = "\n".join(output.strip().splitlines()[-60:])
        raise BenchError(f"row {method.label} failed (launcher exit {proc.returncode}); its "
                         f"ranks' output ends with:\n{tail}")
    return [json.loads(path.read_text()) for path in records]


@contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM becomes KeyboardInterrupt, so that the `finally` clauses stop the ranks and
    remove the link."""
    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _maybe_link(rate: Optional[str]) -> Iterator[object]:
    if rate is None:
        yield None
        return
    from ..netns import EmulatedLink, LinkError
    link = EmulatedLink(rate)
    try:
        try:
            link.up()
        except LinkError as exc:
            raise BenchError(f"--link {rate}: {exc}") from None
        yield link
    finally:
        link.down()


def check_can_launch(np: int, link: Optional[str]) -> None:
    """BenchError before anything is measured when the ranks cannot be started here."""
    if link is not None:
        from .. import netns
        if np != 2:
            raise BenchError(f"--np {np}: the emulated link joins exactly 2 ranks; give --np 2 "
                             "or leave it out")
        try:
            netns.parse_rate(link)
            netns.check_can_emulate()     # names every missing tool, mpirun included
        except (ValueError, netns.LinkError) as exc:
            raise BenchError(f"--link: {exc}") from None
    elif shutil.which("mpirun") is None:
        raise BenchError("bench train starts its ranks with mpirun, which is not on PATH: "
                         "install Open MPI (scripts/setup.sh)")


def bench_train(methods: Sequence[TrainMethod], spec: Dict[str, object], np: int = 2,
                link: Optional[str] = None, row_timeout_s: float = 1800,
                progress: Callable[[str], None] = lambda message: None) -> Dict[str, object]:
    """Measure every row; the JSON document ``bench train`` prints (``results`` in row order)."""
    from .compressors import machine_info
    import torch

    check_can_launch(np, link)
    env, added = rank_environment(np)
    info = {"machine": machine_info(torch.device("cpu")), "world_size": np, "link": link,
            "launcher": "emulated link" if link else "mpirun on this machine",
            "loadavg_start": list(os.getloadavg()), "warmup": spec["warmup"],
            "steps": spec["steps"], "threads": int(env["OMP_NUM_THREADS"]),
            "horovod_settings": settings_in_force(env, added)}
    results: List[TrainResult] = []
    failed: List[Dict[str, str]] = []     # rows whose ranks failed: reported, not fatal
    hosts = None
    with _interrupt_on_sigterm(), tempfile.TemporaryDirectory(prefix="hvdcbench-") as tmp, \
            _maybe_link(link) as emulated:
        ranks = Ranks(np, env, emulated)
        for i, method in enumerate(methods):
            progress(method.label)
            try:
                records = run_row(ranks, method, spec, Path(tmp), f"row{i}", row_timeout_s)
            except BenchError as exc:
                if method.kind == "compute-only":
                    raise          # every ratio is over this row: nothing worth measuring on
                failed.append({"method": method.label, "error": str(exc)})
                progress(f"{method.label} FAILED; the other rows go on "
                         f"({str(exc).splitlines()[0]})")
                continue
            hosts = hosts or [r["hostname"] for r in sorted(records, key=lambda r: r["rank"])]
            results.append(combine(method, records, str(spec["model"]),
                                   int(spec["batch_size"])))
    add_ratios(results)
    info.update(hosts=hosts, loadavg_end=list(os.getloadavg()),
                results=[r.as_dict() for r in results], failed_rows=failed)
    return info
