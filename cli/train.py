"""``hvdcomp train``: data-parallel training with any algorithm × compressor (docs/train.md).

    mpirun -np 2 hvdcomp train                                   # MLP on digits, LIEC-SGD + sign
    mpirun -np 8 hvdcomp train --model resnet18 --dataset cifar10 --data-dir /scratch/cifar \\
           --algorithm liec --compressor sign --epochs 120 --lr 0.1 --schedule step --out runs/x

Everything the user typed is validated here, on every rank, before training. A problem found on
any rank ends every rank with exit code 2 and one line, printed once by the rank that found it
(rank-tagged when it is not rank 0): the ranks settle it in one collective first
(:mod:`hvdcomp.train.agreement`), so neither a hang nor a message lost in mpirun's output can
follow. Runtime failures (divergence, a full disk) print one line on the failing rank and exit 1.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click


def _fail(message: str) -> NoReturn:
    """End this rank with ``message`` (a UserError, exit 2) once every rank of the job has heard
    of it; never returns. The ranks meet in the engine they were asked for (``--engine`` as
    typed), so this works before the options are parsed too."""
    from hvdcomp.train.agreement import fail_across_ranks
    from hvdcomp.train.config import detect_launcher
    fail_across_ranks(message, detect_launcher(), _engine_typed(sys.argv))


def _engine_typed(argv) -> "str | None":
    """The value of ``--engine X`` / ``--engine=X`` in ``argv``, or None."""
    for i, arg in enumerate(argv):
        if arg == "--engine" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--engine="):
            return arg.partition("=")[2]
    return None


class TrainCommand(click.Command):
    """Turns every usage error, Click's own (bad integer, unknown option) included, into one line
    that the other ranks hear of too (see :func:`_fail`)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            _fail(_without_usage(exc))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            _fail(_without_usage(exc))


class AlgorithmOption(click.Option):
    """``--algorithm``, whose help lists the registered methods (hvdcomp.algorithms.registry),
    read when help is shown so that importing the command does not import torch."""

    def get_help_record(self, ctx):
        from hvdcomp.algorithms.registry import cli_help
        self.help = cli_help() + " (docs/algorithms.md)"
        return super().get_help_record(ctx)


def _without_usage(exc: click.UsageError) -> str:
    return " ".join(exc.format_message().split())


@click.command("train", cls=TrainCommand)
@click.option("--model", default="mlp", show_default=True,
              help="resnet18 | resnet34 (PreAct) | resnet20 | cnn | mlp | logreg | "
                   "torchvision:NAME")
@click.option("--dataset", default="digits", show_default=True,
              help="digits | cifar10 | cifar100 | tinyimagenet | "
                   "synthetic[:samples=N,features=F,classes=K,seed=S]")
@click.option("--data-dir", default=None, help="Folder holding the CIFAR / Tiny ImageNet files.")
@click.option("--non-iid", "non_iid_alpha", type=float, default=None, metavar="ALPHA",
              help="Non-IID shards: Dirichlet(ALPHA) label split (default: IID shards).")
@click.option("--augment/--no-augment", default=None,
              help="Random crop (pad 4) + flip; default on for CIFAR / Tiny ImageNet.")
@click.option("--algorithm", default="liec", show_default=True, cls=AlgorithmOption,
              help="every method of hvdcomp.algorithms.registry")
@click.option("--compressor", default=None, metavar="SPEC",
              help="Compressor both ways, e.g. sign, topk:ratio=0.01 (default: none for psgd, "
                   "sign otherwise).")
@click.option("--up", default=None, metavar="SPEC",
              help="Uplink compressor (overrides --compressor).")
@click.option("--down", default=None, metavar="SPEC",
              help="Downlink compressor (default: the uplink's).")
@click.option("--pattern", default=None,
              type=click.Choice(["two_phase", "allgather", "allreduce"]),
              help="Exchange pattern: two_phase (sharded server, default), allgather (GRACE/DGC), "
                   "allreduce (linear compressors); default allgather for dgc.")
@click.option("--period", type=int, default=32, show_default=True,
              help="LIEC-SGD: exact model averaging every PERIOD steps.")
@click.option("--algorithm-option", "algorithm_options", multiple=True, metavar="KEY=VALUE",
              help="Extra algorithm hyperparameter (repeatable), e.g. beta=0.9.")
@click.option("--bucket-bytes", type=int, default=None,
              help="Gradient fusion bucket size: every bucket this size. Default: 25 MiB with a "
                   "1 MiB first bucket (as DDP), so the uplink starts while backward runs.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--steps", type=int, default=None, help="Train this many steps (overrides --epochs).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Per worker.")
@click.option("--lr", type=float, default=0.05, show_default=True,
              help="Peak learning rate (not scaled by the number of ranks).")
@click.option("--momentum", type=float, default=None,
              help="SGD momentum (default: the paper's, 0.9 for psgd and 0 otherwise; dgc and "
                   "ef21sgdm carry their own).")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--nesterov", is_flag=True)
@click.option("--schedule", default="cosine", show_default=True, help="constant | step | cosine")
@click.option("--milestones", default="0.5,0.75", show_default=True,
              help="Step schedule: fractions of training where lr is multiplied by 0.1.")
@click.option("--warmup-epochs", type=float, default=0.0, show_default=True,
              help="Linear learning-rate warm-up.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default=None,
              help="Run directory (default "
                   "runs/<dataset>-<model>-<algorithm>-<compressor>-n<N>-s<seed>).")
@click.option("--overwrite", is_flag=True, help="Replace a finished or interrupted run in --out.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its latest checkpoint.")
@click.option("--log-every", type=int, default=10, show_default=True,
              help="Steps between step records in metrics.jsonl.")
@click.option("--checkpoint-every", default=None, metavar="N[epochs|steps]",
              help="Checkpoint every N epochs ('2', '2epochs') or steps ('100steps').")
@click.option("--keep-checkpoints", type=int, default=2, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda")
@click.option("--engine", default=None, type=click.Choice(["horovod", "torch"]),
              help="Library carrying the collectives: horovod (hvd.init from mpirun/srun/"
                   "horovodrun) or torch (torch.distributed: Gloo on CPU, NCCL on CUDA; under "
                   "torchrun, mpirun or srun). Default: torch under torchrun, else horovod when "
                   "it imports, else torch.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or per-epoch lines.")
@click.option("--tensorboard", is_flag=True,
              help="Also write loss, accuracy, bytes per direction and time components per step "
                   "as TensorBoard events into RUN_DIR/tensorboard "
                   "(needs: pip install tensorboard).")
@click.option("--stall-timeout", type=float, default=None, metavar="SECONDS",
              help="End the job when a collective waits this long for the other ranks "
                   "(default 60, or HVDCOMP_STALL_TIMEOUT; 0 turns the guard off).")
@click.option("--stop-after-steps", type=int, default=None, hidden=True,
              help="Testing: exit like a crash after this many steps.")
def command(model, dataset, data_dir, non_iid_alpha, augment, algorithm, compressor, up, down,
            pattern, period, algorithm_options, bucket_bytes, epochs, steps, batch_size, lr,
            momentum, weight_decay, nesterov, schedule, milestones, warmup_epochs, seed, out,
            overwrite, resume, log_every, checkpoint_every, keep_checkpoints, device, engine, quiet,
            stall_timeout, stop_after_steps, tensorboard) -> None:
    """Data-parallel training with compressed, error-compensated gradient exchange.

    Launch with `mpirun -np N hvdcomp train ...`, `srun --mpi=pmix hvdcomp train ...`,
    `horovodrun -np N hvdcomp train ...`, `torchrun --nproc_per_node N $(which hvdcomp) train
    ...`, or as a single process. Writes a run directory
    (config.json, env.json, metrics.jsonl, summary.json, checkpoints/) and prints a summary."""
    from hvdcomp import stall
    from hvdcomp.train.config import ConfigError, TrainConfig, parse_key_values

    try:
        if stall_timeout is not None:
            stall.set_timeout(stall_timeout)
        if stop_after_steps is not None and stop_after_steps < 1:
            raise ConfigError("--stop-after-steps must be >= 1")
        cfg = TrainConfig(
            model=model, dataset=dataset, data_dir=data_dir, non_iid_alpha=non_iid_alpha,
            augment=augment, algorithm=algorithm, up=up or compressor, down=down, pattern=pattern,
            period=period,
            algorithm_options=parse_key_values(algorithm_options), bucket_bytes=bucket_bytes,
            epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, momentum=momentum,
            weight_decay=weight_decay, nesterov=nesterov, schedule=schedule.strip().lower(),
            milestones=_fractions(milestones), warmup_epochs=warmup_epochs, seed=seed, out=out,
            log_every=log_every, checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, device=device, tensorboard=tensorboard,
            engine=engine)
        if tensorboard:
            _require_tensorboard()
        prepared = prepare(cfg, resume=resume, overwrite=overwrite, quiet=quiet)
    except (ConfigError, ValueError, OSError) as exc:
        _fail(str(exc))

    from hvdcomp.compressors import CompressionError
    from hvdcomp.train.config import TrainingFailed
    from hvdcomp.train.loop import run
    try:
        run(prepared.config, prepared.out_dir, prepared.launcher,
            resume_state=prepared.resume_state, quiet=quiet, stop_after_steps=stop_after_steps)
    except (TrainingFailed, CompressionError, OSError) as exc:
        _runtime_failure(exc)
    finally:
        if prepared.lock is not None:
            prepared.lock.release()


def _runtime_failure(exc: BaseException) -> None:
    """A failure on this rank while training (a NaN loss, non-finite gradients refused by a
    compressor, a full disk): one line, exit 1; the launcher then stops the other ranks."""
    from hvdcomp.errors import debug_enabled
    if debug_enabled():
        raise exc
    from hvdcomp.cli.main import rank_tag
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        message = f"{exc.strerror or exc}{where}"
    else:
        message = str(exc)
    click.echo(f"Error{rank_tag()}: {message}", err=True)
    sys.exit(1)


def _require_tensorboard() -> None:
    """--tensorboard needs torch.utils.tensorboard and the tensorboard package it imports."""
    from hvdcomp.train.config import ConfigError
    import importlib
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError as exc:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({exc}): "
                          "pip install tensorboard, or leave out --tensorboard") from None


def _fractions(text: str):
    from hvdcomp.train.config import ConfigError
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--milestones {text!r}: expected comma-separated fractions like "
                          "0.5,0.75") from None


class Prepared:
    """A validated configuration, its run directory (locked by rank 0) and the resumed state."""

    def __init__(self, config, out_dir: Path, launcher, resume_state, lock=None):
        self.config, self.out_dir, self.launcher = config, out_dir, launcher
        self.resume_state, self.lock = resume_state, lock


def prepare(cfg, resume: bool = False, overwrite: bool = False, quiet: bool = True) -> Prepared:
    """Validate ``cfg`` and the run directory before any rank starts (raises ConfigError,
    ValueError or OSError with a message naming the problem and the fix). Rank 0 takes the run
    directory's lock; the caller releases ``Prepared.lock`` when the run ends."""
    from hvdcomp.train.config import default_out_dir, detect_launcher

    from hvdcomp.train import engine

    launcher = detect_launcher()
    cfg = _validated(cfg.resolved(), launcher)
    cfg.engine = cfg.engine or engine.default_engine(launcher)
    engine.check_engine(cfg.engine, launcher, cfg.device)
    out_dir = Path(cfg.out or default_out_dir(cfg, launcher["world_size"]))
    cfg.out = str(out_dir)
    _check_writable(out_dir)
    lock = _lock_run_directory(out_dir, quiet) if launcher["rank"] == 0 else None
    try:
        resume_state = _run_directory_state(cfg, out_dir, launcher, resume, overwrite)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Prepared(cfg, out_dir, launcher, resume_state, lock)


def _validated(cfg, launcher):
    """Model, dataset, device and the algorithm's own hyperparameters of a resolved ``cfg``."""
    from hvdcomp.train.config import ConfigError
    from hvdcomp.train.data import DataError, check_dataset, parse_dataset_spec
    from hvdcomp.train.models import check_model_name, needs_images

    try:
        cfg.model = check_model_name(cfg.model)
        check_dataset(cfg.dataset, cfg.data_dir)
    except (DataError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if needs_images(cfg.model) and parse_dataset_spec(cfg.dataset)[0] == "synthetic":
        raise ConfigError(f"model {cfg.model!r} needs images; dataset 'synthetic' has feature "
                          "vectors: use --model mlp or logreg")
    if cfg.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible to this process; "
                              "use --device cpu")
    from hvdcomp.algorithms import registry
    from hvdcomp.train.distributed import is_dense_baseline
    if not is_dense_baseline(cfg):
        try:
            # the method checks its own hyperparameters (registry.TrainingMethod.check_train)
            registry.method(cfg.algorithm).check_train(cfg, launcher["world_size"],
                                                       launcher["rank"])
            if cfg.pattern == "allreduce":
                from hvdcomp.compressors import from_spec
                from hvdcomp.exchange import summable_dtype
                import torch
                summable_dtype(from_spec(cfg.up), torch.float32)
        except ImportError as exc:
            raise ConfigError(f"algorithm {cfg.algorithm!r} needs hvdcomp's optimizer, which "
                              f"does not import here ({exc})") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"algorithm {cfg.algorithm!r}: {exc}") from None
    return cfg


def _check_writable(out_dir: Path) -> None:
    from hvdcomp.train.config import ConfigError
    from hvdcomp.train.results import check_writable
    try:
        check_writable(out_dir)
    except OSError as exc:
        raise ConfigError(f"cannot write to output directory {out_dir}: "
                          f"{exc.strerror or exc}; choose another --out") from None


def _lock_run_directory(out_dir: Path, quiet: bool):
    """Rank 0: refuse a folder a live run uses, then remove what interrupted writers left."""
    from hvdcomp.train.lock import RunLock, remove_stale_temporaries
    lock = RunLock(out_dir).acquire()
    removed = remove_stale_temporaries(out_dir)
    if removed and not quiet:
        click.echo(f"hvdcomp train: removed {len(removed)} temporary file(s) that interrupted "
                   f"writes left in {out_dir}", err=True)
    return lock


def _run_directory_state(cfg, out_dir: Path, launcher, resume: bool, overwrite: bool):
    """The checkpoint to resume from (or None); refuses to reuse a finished run's folder by
    accident; on ``--overwrite`` removes the old run's checkpoints (rank 0)."""
    from hvdcomp.train import checkpoint as ckpt
    from hvdcomp.train.config import ConfigError, resume_mismatch

    has_run = (out_dir / "metrics.jsonl").exists() or (out_dir / "summary.json").exists()
    if not resume:
        if has_run and not overwrite:
            raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")
        if overwrite and launcher["rank"] == 0:
            # Old checkpoints would otherwise be taken for this run's by a later --resume
            # (metrics.jsonl and summary.json are replaced by rank 0 when the run starts).
            ckpt.remove_all(out_dir / "checkpoints")
        return None
    latest = ckpt.latest_checkpoint(out_dir / "checkpoints")
    if latest is None:
        raise ConfigError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; the run "
                          "must have been started with --checkpoint-every")
    resume_state = ckpt.load_checkpoint(latest)
    if resume_state["world_size"] != launcher["world_size"]:
        raise ConfigError(f"--resume: {latest} was written by {resume_state['world_size']} "
                          f"ranks, this run has {launcher['world_size']}; resume with "
                          f"-np {resume_state['world_size']}")
    differ = resume_mismatch(resume_state["config"], cfg.to_dict())
    if differ:
        raise ConfigError(f"--resume: options differ from the checkpointed run: "
                          f"{', '.join(differ)}; resume with the same options")
    return ckpt.load_for_rank(latest, launcher["rank"])   # the manifest and this rank's shard


def main() -> None:  # `python -m hvdcomp.cli.train`: through the group, for its error handling
    from hvdcomp.cli.main import cli
    sys.exit(cli.main(["train", *sys.argv[1:]], prog_name="hvdcomp"))


if __name__ == "__main__":
    main()
