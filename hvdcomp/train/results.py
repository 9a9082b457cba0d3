"""The run directory of docs/design.md ("Run directories"), written by rank 0 only.

::

    RUN_DIR/
      config.json      resolved training configuration (every option, plus world_size, launcher)
      env.json         doctor facts: versions, MPI, Horovod build, hostname, world size, launcher
      metrics.jsonl    one JSON object per line, flushed per line
      summary.json     written atomically at the end of a successful run
      checkpoints/     ckpt-<step>.pt (see checkpoint.py), latest.pt -> newest

Also here: the compression ratio against P-SGD and the end-of-run summary table.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..atomic import atomic_write_text
from ..exchange_ledger import ring_allreduce_mean
from ..labels import directions, method_name


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def check_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be written in it; OSError otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe-")
    os.close(fd)
    os.unlink(probe)


def environment_facts(world_size: int, launcher: Dict[str, Any]) -> Dict[str, Any]:
    """hvdcomp.doctor.collect_facts() when that module exists, plus what this run knows itself."""
    facts: Dict[str, Any] = {}
    try:
        from hvdcomp.doctor import collect_facts
        facts = dict(collect_facts())
    except Exception as exc:  # noqa: BLE001 - doctor is optional here; record why it is absent
        facts["doctor_error"] = f"{type(exc).__name__}: {exc}"
    import torch
    facts.setdefault("hostname", socket.gethostname())
    facts.setdefault("python", sys.version.split()[0])
    facts.setdefault("platform", platform.platform())
    facts.setdefault("torch", torch.__version__)
    try:
        import horovod
        facts.setdefault("horovod", horovod.__version__)
    except Exception:  # noqa: BLE001
        pass
    facts["world_size"] = world_size
    facts["launcher"] = launcher
    return facts


class RunDirectory:
    """Rank 0's writer for one run directory. Other ranks never construct one."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.jsonl"
        self._metrics = None
        self._tensorboard = None

    def start(self, config: Dict[str, Any], env: Dict[str, Any],
              resume_step: Optional[int]) -> None:
        """Write config.json and env.json; open metrics.jsonl (fresh, or cut back to the resumed
        checkpoint's step so that the steps replayed after a crash are not listed twice)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        atomic_write_json(self.root / "config.json", config)
        atomic_write_json(self.root / "env.json", env)
        if resume_step is None:
            for stale in ("summary.json", "metrics.jsonl"):
                (self.root / stale).unlink(missing_ok=True)
        else:
            (self.root / "summary.json").unlink(missing_ok=True)
            kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self._metrics = open(self.metrics_path, "a", buffering=1)
        if config.get("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter   # checked by the CLI up front
            # a resumed run drops the events past its checkpoint, as metrics.jsonl does
            self._tensorboard = SummaryWriter(
                str(self.root / "tensorboard"),
                purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: Dict[str, Any]) -> None:
        """Append one record and flush it to the OS, so a killed run keeps what it measured."""
        self._metrics.write(json.dumps(record, default=float) + "\n")
        self._metrics.flush()
        if self._tensorboard is not None:
            for tag, value in tensorboard_scalars(record).items():
                self._tensorboard.add_scalar(tag, value, global_step=int(record["step"]))

    def finish(self, summary: Dict[str, Any]) -> None:
        atomic_write_json(self.root / "summary.json", summary)
        self.close()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


#: TensorBoard tag of each metrics.jsonl field, per event; other numeric fields: ``event/key``.
TENSORBOARD_TAGS = {
    "step": {"loss": "train/loss", "lr": "train/lr", "bytes_up": "bytes/up",
             "bytes_down": "bytes/down",
             "time_compute": "time/compute", "time_compress": "time/compress",
             "time_comm": "time/comm", "wall_time": "time/wall"},
    "epoch": {"loss": "epoch/train_loss", "train_accuracy": "epoch/train_accuracy",
              "test_accuracy": "epoch/test_accuracy", "test_loss": "epoch/test_loss"},
}
#: Fields that are positions, not measurements (the x axis already says them).
NOT_SCALARS = {"event", "step", "epoch", "samples"}


def tensorboard_scalars(record: Dict[str, Any]) -> Dict[str, float]:
    """The scalars of one metrics record under their TensorBoard tags. Bytes and times are
    cumulative per rank, as in metrics.jsonl; an epoch record's counters repeat its step's."""
    event = str(record.get("event", ""))
    tags = TENSORBOARD_TAGS.get(event, {})
    scalars = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if event == "epoch" and key not in tags:
            continue   # bytes and times: logged with the step record of the same step
        scalars[tags.get(key, f"{event}/{key}")] = float(value)
    return scalars


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """Records of a metrics.jsonl; a last line cut short by a crash is skipped."""
    records = []
    if not Path(path).exists():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def psgd_bytes_per_step(gradient_bytes: int, world_size: int) -> float:
    """Bytes one rank sends per step under P-SGD: a ring allreduce of the dense 32-bit gradient,
    (N−1)/N of it in the reduce-scatter ("up") and as much again in the allgather ("down")."""
    return 2.0 * ring_allreduce_mean(gradient_bytes, world_size)


def compression_ratio(gradient_bytes: int, world_size: int, steps: int, bytes_up: float,
                      bytes_down: float) -> Optional[float]:
    """How many times fewer bytes this run sent than P-SGD would have in the same steps:
    ``psgd_bytes_per_step × steps / (bytes_up + bytes_down)``; None on a single process (nothing
    is sent) or when nothing was sent."""
    sent = bytes_up + bytes_down
    if world_size < 2 or sent <= 0:
        return None
    return psgd_bytes_per_step(gradient_bytes, world_size) * steps / sent


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _settings_rows(config: Dict[str, Any]) -> List[tuple]:
    """The optimiser settings the run used (defaults are the paper's; others were asked for)."""
    if "momentum" not in config:
        return []
    rows = []
    if config.get("algorithm") != "monna":   # MoNNA's momentum β is one of its options
        from .uncompressed import describe_momentum
        rows.append(("lr / SGD momentum / weight decay",
                     f"{config.get('lr')} / {describe_momentum(config)} / "
                     f"{config.get('weight_decay')}"))
    if config.get("algorithm_options"):
        rows.append(("algorithm options", ", ".join(
            f"{k}={v}" for k, v in sorted(config["algorithm_options"].items()))))
    return rows


def _message_rows(summary: Dict[str, Any]) -> List[tuple]:
    """One uplink message of the compressed tensors against the same tensors dense; the run's
    ratio above also pays for warm-up, dense small tensors and every copy sent."""
    per_message = summary.get("compression_per_message")
    return [] if per_message is None else [
        ("compression per uplink message", f"{per_message:.1f}x (compressed tensors, last step)")]


def print_summary(summary: Dict[str, Any], config: Dict[str, Any], file=None) -> None:
    """The end-of-run table on rank 0 (see :func:`write_table`). The compressors are named as
    they travel (:mod:`hvdcomp.labels`): MEM-SGD's and EF21's downlink is dense whatever
    ``down`` says."""
    ratio = summary.get("compression_ratio")
    rows = [
        ("algorithm", f"{config['algorithm']}: {method_name(config)}"),
        ("what travels", directions(config)),
        ("model / dataset", f"{config['model']} / {config['dataset']}"),
        *_settings_rows(config),
        ("ranks (launcher)", f"{config['world_size']} ({config['launcher']})"),
        *_horovod_rows(config),
        ("final test accuracy", f"{100 * summary['final_accuracy']:.2f}%"),
        ("best test accuracy", f"{100 * summary['best_accuracy']:.2f}%"),
        ("steps / epochs", f"{summary['steps']} / {summary['epochs']:g}"),
        ("wall time", f"{summary['wall_time']:.1f} s ({summary['samples_per_s']:.0f} samples/s)"),
        ("time compute / compress / comm",
         f"{summary['time_compute']:.1f} / {summary['time_compress']:.1f} / "
         f"{summary['time_comm']:.1f} s"),
        ("bytes sent up / down per rank",
         f"{human_bytes(summary['bytes_up'])} / {human_bytes(summary['bytes_down'])}"),
        ("compression vs P-SGD, whole run",
         "n/a (one rank)" if ratio is None else f"{ratio:.1f}x"),
        *_message_rows(summary),
        ("run directory", str(summary.get("run_dir", ""))),
    ]
    write_table(rows, file)


def _horovod_rows(config: Dict[str, Any]) -> List[tuple]:
    """The Horovod settings in force and where each came from (Horovod engine runs)."""
    settings = config.get("horovod_settings")
    if not settings:
        return []
    from ..horovod_settings import describe
    return [("Horovod settings", describe(settings))]


def write_table(rows: List[tuple], file=None) -> None:
    """A rich table on a terminal; plain ``key  value`` lines (no colour codes, no box, nothing
    cut short) when the output is a file, a pipe or a Slurm log, or rich is missing."""
    from .progress import is_terminal
    stream = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    terminal = is_terminal() and (file is None or file is sys.stdout)
    if Console is None or not terminal:
        # a log in a legacy encoding gets '?' for the arrows rather than a failed run
        encoding = getattr(stream, "encoding", None) or "utf-8"
        lines = ["hvdcomp train: summary", *(f"  {key:32s} {value}" for key, value in rows)]
        for line in lines:
            print(line.encode(encoding, errors="replace").decode(encoding), file=stream)
        stream.flush()
        return
    table = Table(title="hvdcomp train: summary", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")   # a long run-directory path wraps, never ends in "…"
    for key, value in rows:
        table.add_row(key, value)
    Console(file=file).print(table)
