"""The resolved training configuration, its validation, and launcher detection.

Everything here runs *before* ``hvd.init()``: bad input must end the job with one line and exit
code 2 on every rank before any rank starts training (a rank that died in ``hvd.init`` or in the
first collective would leave the others hanging or print pages of MPI noise).

``TrainConfig`` is what ``config.json`` holds (plus ``world_size`` and ``launcher``) and what a
checkpoint is compared against on ``--resume``.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..exchange import PATTERNS

from ..algorithms import registry as _registry
from ..errors import UserError

# The per-method tables below are read from the registry of training methods
# (hvdcomp.algorithms.registry): each method declares them on its own class.
#: Methods ``hvdcomp train`` knows, in listing order.
ALGORITHMS = tuple(_registry.names())
#: Methods whose update direction already carries a momentum of their own (DGC's momentum
#: correction, EF21-SGDM's v_i, MoNNA's Polyak momentum): the wrapped SGD then defaults to
#: momentum 0 so that momentum is not applied twice.
MOMENTUM_INSIDE = tuple(n for n in ALGORITHMS if _registry.info(n).momentum_inside)
#: SGD momentum when --momentum is not given: the paper's setting for each method
#: (``MethodInfo.sgd_momentum``; 0.9 for the dense baseline psgd, 0 for the methods whose papers
#: ran plain SGD and for MOMENTUM_INSIDE). Any other value is an explicit --momentum, printed in
#: the summary.
PAPER_SGD_MOMENTUM = {n: _registry.info(n).sgd_momentum for n in ALGORITHMS
                      if _registry.info(n).sgd_momentum}
#: Algorithms train cannot run yet, with the reason shown to the user.
UNSUPPORTED: Dict[str, str] = {}
SCHEDULES = ("constant", "step", "cosine")
#: the libraries that can carry the collectives (hvdcomp.train.engine)
ENGINES = ("horovod", "torch")


class ConfigError(UserError, ValueError):
    """Bad user input; the CLI turns it into a one-line error with exit code 2."""


class TrainingFailed(RuntimeError):
    """The run cannot go on (diverged, non-finite gradients); the CLI prints one line and exits 1.
    The launcher (mpirun, srun --kill-on-bad-exit, horovodrun) then ends the other ranks."""


#: Default compressors and pattern of each method (``MethodInfo.up``/``down``/``pattern``):
#: sign both ways unless its paper does otherwise (P-SGD dense; DGC its sampled top-k up,
#: allgathered, nothing down; the dense-downlink methods none down; MoNNA exchanges models).
DEFAULT_UP = {n: _registry.info(n).up for n in ALGORITHMS}
DEFAULT_DOWN = {n: _registry.default_down(n, _registry.info(n).up) for n in ALGORITHMS}
DEFAULT_PATTERN = {n: _registry.info(n).pattern for n in ALGORITHMS
                   if _registry.info(n).pattern is not None}


@dataclass
class TrainConfig:
    # model and data
    model: str = "mlp"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    non_iid_alpha: Optional[float] = None  # Dirichlet α of the label split; None = IID shards
    augment: Optional[bool] = None  # None: on for CIFAR / Tiny ImageNet, off otherwise
    # algorithm
    algorithm: str = "liec"
    up: Optional[str] = None  # uplink compressor spec; None: DEFAULT_UP[algorithm] or "sign"
    down: Optional[str] = None  # downlink compressor spec; None: DEFAULT_DOWN[algorithm] or up
    # exchange pattern; None: DEFAULT_PATTERN[algorithm] or the optimizer's
    pattern: Optional[str] = None
    period: int = 32  # LIEC-SGD's exact-averaging period p
    algorithm_options: Dict[str, Any] = field(default_factory=dict)
    bucket_bytes: Optional[int] = None   # None: the optimizer's (25 MiB, first bucket 1 MiB)
    # optimisation
    epochs: int = 10
    steps: Optional[int] = None  # when set, overrides epochs
    batch_size: int = 32  # per worker
    lr: float = 0.05
    momentum: Optional[float] = None  # None: PAPER_SGD_MOMENTUM (0.9 for psgd, else 0)
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    milestones: Tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of training (×0.1 each)
    warmup_epochs: float = 0.0
    seed: int = 0
    # bookkeeping
    out: Optional[str] = None
    log_every: int = 10  # steps between "step" records in metrics.jsonl
    checkpoint_every: Optional[str] = None  # "3" / "3epochs" / "100steps"
    keep_checkpoints: int = 2
    device: str = "cpu"
    tensorboard: bool = False  # also write TensorBoard event files into RUN_DIR/tensorboard
    # the library carrying the collectives: "horovod" | "torch"; None: chosen by the CLI from the
    # launcher (hvdcomp.train.engine.default_engine)
    engine: Optional[str] = None

    # ------------------------------------------------------------------------------------------
    def resolved(self) -> "TrainConfig":
        """Fill the defaults that depend on other options; validate everything.

        Raises ConfigError."""
        cfg = dataclasses.replace(self, algorithm_options=dict(self.algorithm_options))
        cfg.model = cfg.model.strip().lower()
        cfg.algorithm = cfg.algorithm.strip().lower()
        method = _apply_method_defaults(cfg)
        if cfg.algorithm in UNSUPPORTED:
            raise ConfigError(f"algorithm {cfg.algorithm!r} is not supported by `hvdcomp train` "
                              f"yet: {UNSUPPORTED[cfg.algorithm]}")
        _check_choice("--pattern", cfg.pattern, PATTERNS)
        cfg.up = _canonical_compressor(cfg.up, "--up/--compressor")
        cfg.down = _canonical_compressor(cfg.down, "--down")
        if cfg.momentum is None:
            cfg.momentum = method.sgd_momentum      # the paper's SGD momentum
        if cfg.augment is None:
            cfg.augment = dataset_name(cfg.dataset) in ("cifar10", "cifar100", "tinyimagenet")
        _check_counts(cfg)
        _check_optimisation(cfg)
        if cfg.checkpoint_every is not None:
            parse_checkpoint_every(cfg.checkpoint_every)
        _check_choice("--device", cfg.device, ("cpu", "cuda"))
        _check_choice("--engine", cfg.engine, ENGINES)
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "milestones" in kwargs:
            kwargs["milestones"] = tuple(kwargs["milestones"])
        return cls(**kwargs)


def _check_choice(option: str, value: Optional[str], choices) -> None:
    """``value`` (None: not given) must be one of ``choices``."""
    if value is not None and value not in choices:
        raise ConfigError(f"unknown {option} {value!r}; choose one of: {', '.join(choices)}")


def _check_counts(cfg: TrainConfig) -> None:
    """The options that count something: at least 1."""
    for option, value in (("--epochs", cfg.epochs), ("--steps", cfg.steps),
                          ("--batch-size", cfg.batch_size), ("--period", cfg.period),
                          ("--log-every", cfg.log_every),
                          ("--keep-checkpoints", cfg.keep_checkpoints),
                          ("--bucket-bytes", cfg.bucket_bytes)):
        if value is not None:          # --steps and --bucket-bytes may be left to their default
            _check_range(option, value, 1)


def _check_optimisation(cfg: TrainConfig) -> None:
    """Learning rate, momentum, weight decay, schedule and data split."""
    if not cfg.lr > 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if cfg.warmup_epochs < 0:
        raise ConfigError(f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    _check_choice("schedule", cfg.schedule, SCHEDULES)
    if any(not 0 < m < 1 for m in cfg.milestones):
        raise ConfigError(f"--milestones are fractions of training in (0, 1), got "
                          f"{list(cfg.milestones)}")
    if cfg.non_iid_alpha is not None and not cfg.non_iid_alpha > 0:
        raise ConfigError(f"--non-iid must be a positive Dirichlet alpha, got "
                          f"{cfg.non_iid_alpha}")


#: Options that may differ between an interrupted run and its --resume (they do not change the
#: trajectory of the parameters).
RESUME_MAY_DIFFER = ("out", "log_every", "checkpoint_every", "keep_checkpoints", "device",
                     "data_dir", "tensorboard", "engine")


def resume_mismatch(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Names of options whose values differ between a checkpoint's config and this run's."""
    keys = (set(saved) | set(current)) - set(RESUME_MAY_DIFFER)
    return sorted(k for k in keys if _jsonish(saved.get(k)) != _jsonish(current.get(k)))


def _jsonish(value):
    return list(value) if isinstance(value, tuple) else value


def _apply_method_defaults(cfg: TrainConfig) -> "_registry.MethodInfo":
    """Fill ``cfg``'s compressors and pattern from its method's declaration in the registry
    (:mod:`hvdcomp.algorithms.registry`); returns that declaration."""
    try:
        method = _registry.info(cfg.algorithm)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if method.compressors_refused and (cfg.up or cfg.down) not in (None, "none"):
        raise ConfigError(f"algorithm {cfg.algorithm!r} {method.compressors_refused}: drop "
                          "--compressor/--up/--down")
    if cfg.up is None:
        cfg.up = method.up
    if cfg.down is None:
        # the declared downlink, or the uplink's, or none for a method that sends its downlink
        # dense (a --down is refused there)
        cfg.down = _registry.default_down(cfg.algorithm, cfg.up)
    if cfg.pattern is None:
        cfg.pattern = method.pattern
    return method


def _check_range(option: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{option} must be >= {low}, got {value}")


def _canonical_compressor(spec: str, option: str) -> str:
    """Validate a compressor spec with hvdcomp.compressors.from_spec; return its canonical spec."""
    from hvdcomp.compressors import from_spec
    try:
        return from_spec(spec).spec()
    except ValueError as exc:
        raise ConfigError(f"{option} {spec!r}: {exc}") from None


def dataset_name(spec: str) -> str:
    return spec.strip().lower().partition(":")[0]


_CKPT_RE = re.compile(r"^\s*(\d+)\s*(steps?|epochs?)?\s*$")


def parse_checkpoint_every(text: str) -> Tuple[int, str]:
    """``"3"`` or ``"3epochs"`` -> (3, "epoch"); ``"100steps"`` -> (100, "step")."""
    match = _CKPT_RE.match(str(text))
    if not match or int(match.group(1)) < 1:
        raise ConfigError(f"--checkpoint-every {text!r}: expected a positive count of epochs "
                          "('2' or '2epochs') or steps ('100steps')")
    unit = "step" if (match.group(2) or "epoch").startswith("step") else "epoch"
    return int(match.group(1)), unit


def parse_key_values(items) -> Dict[str, Any]:
    """``["eta=0.5", "smoothness=[1,2]"]`` -> {"eta": 0.5, "smoothness": [1, 2]}: ints, floats,
    booleans, JSON lists, else strings."""
    import json
    from hvdcomp.compressors.registry import _parse_value
    out: Dict[str, Any] = {}
    for item in items:
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--algorithm-option {item!r}: expected key=value")
        value = value.strip()
        if value.startswith("["):
            try:
                out[key.strip()] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--algorithm-option {item!r}: not a JSON list ({exc})") from None
        else:
            out[key.strip()] = _parse_value(value)
    return out


def default_out_dir(cfg: TrainConfig, world_size: int) -> str:
    """``runs/<dataset>-<model>-<algorithm>-<up>[-<down>]-n<N>-s<seed>``, the same on every rank."""
    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")
    comp = clean(cfg.up) if cfg.down == cfg.up else f"{clean(cfg.up)}-{clean(cfg.down)}"
    return str(Path("runs") / f"{clean(cfg.dataset)}-{clean(cfg.model)}-{cfg.algorithm}-{comp}"
                               f"-n{world_size}-s{cfg.seed}")


# --- launcher ---------------------------------------------------------------------------------
def detect_launcher(env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Which launcher started this process, and the rank / world size it announced.

    Order matters: ``horovodrun`` (Gloo) sets HOROVOD_RANK; ``horovodrun`` with MPI runs
    ``mpirun --tag-output -x NCCL_SOCKET_IFNAME=<nics> ...`` (horovod/runner/mpi_run.py), which
    sets no HOROVOD_* variable but leaves OMPI_MCA_orte_tag_output=1 and NCCL_SOCKET_IFNAME in
    every rank (a plain ``mpirun`` sets neither unless asked to); Open MPI's ``mpirun`` sets
    OMPI_COMM_WORLD_* and points its children at itself (OMPI_MCA_orte_hnp_uri, or PMIX_SERVER_URI
    from mpirun's PMIx server); ``srun`` sets SLURM_STEP_ID and SLURM_PROCID for each task (with
    --mpi=pmix Open MPI's OMPI_COMM_WORLD_* may be set too, but without mpirun's head-node URI);
    MPICH/Hydra sets PMI_RANK; ``torchrun`` sets TORCHELASTIC_RUN_ID, RANK and WORLD_SIZE in every
    worker, and is checked first because ``srun torchrun ...`` leaves Slurm's variables (one task
    per node, not per rank) in its workers. Without any of them this is a single process (N = 1).
    """
    env = dict(os.environ if env is None else env)

    def as_int(*names: str) -> Optional[int]:
        for name in names:
            if env.get(name, "").strip().isdigit():
                return int(env[name])
        return None

    horovod_vars = [k for k in env if k.startswith("HOROVOD_")]
    name = _launcher_name(env)
    rank = as_int("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
    size = as_int("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS",
                  "SLURM_NPROCS")
    if name == "torchrun":
        rank, size = as_int("RANK"), as_int("WORLD_SIZE")
    if name == "single":
        rank, size = 0, 1
    return {"name": name, "rank": rank if rank is not None else 0,
            "world_size": size if size is not None else 1,
            "slurm_job_id": env.get("SLURM_JOB_ID"),
            "horovod_env": sorted(horovod_vars)}


def _launcher_name(env: Dict[str, str]) -> str:
    """The launcher of :func:`detect_launcher` (its docstring says why in this order)."""
    horovodrun_mpi = "OMPI_COMM_WORLD_SIZE" in env and (
        "HOROVOD_HOSTNAME" in env
        or (env.get("OMPI_MCA_orte_tag_output") == "1" and "NCCL_SOCKET_IFNAME" in env))
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "HOROVOD_RANK" in env or "HOROVOD_GLOO_RENDEZVOUS_ADDR" in env or horovodrun_mpi:
        return "horovodrun"
    if "OMPI_COMM_WORLD_SIZE" in env and "SLURM_STEP_ID" in env and not (
            "OMPI_MCA_orte_hnp_uri" in env or "OMPI_MCA_orte_local_daemon_uri" in env):
        return "srun"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_RANK" in env:
        return "mpirun"
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return "srun"
    return "single"
