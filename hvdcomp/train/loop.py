"""The data-parallel training loop behind ``hvdcomp train``.

One process per rank (mpirun, srun, horovodrun, or a lone process). Each step every rank:

1. takes its next batch (its own shard; order and augmentation seeded by (seed, rank, epoch,
   step), see :mod:`.data`),
2. runs forward and backward; the distributed optimizer's hooks start the exchange,
3. ``DistributedStep.step()``: waits for the exchange, applies LIEC-style exact model averaging
   when the optimizer asks for it, then the SGD update (momentum, weight decay).

Evaluation uses the **averaged model**: parameters and buffers are averaged over ranks into the
live model, the test set is evaluated (rank r takes test samples r, r+N, ...; sums are allreduced),
then every rank's own state is restored, so evaluation never changes the training trajectory.
For P-SGD the parameters are equal on all ranks already; for LIEC between synchronisations they
are not, and averaging gives the model the paper evaluates.

BatchNorm: running statistics are never synchronised during training (training-mode forward
passes use batch statistics, so they do not affect the trajectory); for evaluation they are
**averaged over ranks** together with the parameters, i.e. the evaluated model uses the mean of
the ranks' running means and variances. Averaging (rather than broadcasting rank 0's) uses every
rank's data, which matters for non-IID shards.

The only code that knows which distributed optimizer runs is :func:`build_distributed_optimizer`.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from .. import stall
from ..errors import UserError
from . import checkpoint as ckpt
from .agreement import settings_of, settle
from .config import TrainConfig, TrainingFailed, parse_checkpoint_every
from .data import (Dataset, augment_generator, epoch_order, eval_indices, load_dataset,
                   shard_indices, steps_per_epoch)
from .models import build_model
from .results import (RunDirectory, compression_ratio, environment_facts, print_summary)
from .progress import ProgressReporter

#: Exit status of a run stopped by --stop-after-steps (it exits like a crash: no summary).
STOPPED_EXIT_CODE = 3
COUNTERS = ("bytes_up", "bytes_down", "time_compress", "time_comm")


# --- the one place that knows the distributed optimizer -------------------------------------------
def build_distributed_optimizer(model: torch.nn.Module, cfg: TrainConfig, hvd,
                                steps_per_epoch_: Optional[int] = None) -> "DistributedStep":
    """The SGD optimizer of ``cfg`` wrapped for data-parallel training.

    * ``psgd`` with ``none`` both ways: Horovod's own ``hvd.DistributedOptimizer`` (ring
      allreduce of the dense gradient), the P-SGD baseline with the optimizer users know;
    * everything else: ``hvdcomp.DistributedOptimizer`` with the compression of
      :func:`make_compression`. It averages LIEC-SGD's models itself in ``step()``.

    DGC and EF21-SGDM carry their momentum inside the compressed update; the tensors they send
    dense get the method's momentum in a parameter group of their own (:mod:`.uncompressed`).
    """
    if cfg.algorithm == "monna":
        from hvdcomp.comm import HorovodCommunicator
        from .robust_step import MoNNAStep
        return MoNNAStep(model, cfg, HorovodCommunicator())
    from hvdcomp.optimizer import DEFAULT_SMALL_TENSOR_BYTES
    from .uncompressed import parameter_groups
    base = torch.optim.SGD(parameter_groups(model, cfg, DEFAULT_SMALL_TENSOR_BYTES), lr=cfg.lr,
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                         if p.requires_grad)
    if is_horovod_baseline(cfg):
        optimizer = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
        return DistributedStep(optimizer, gradient_bytes, hvd.size(), horovod_baseline=True)
    # lazily: only the compressed paths need the integration layer
    from hvdcomp.optimizer import DistributedOptimizer
    compression = make_compression(cfg, hvd.size(), hvd.rank(), steps_per_epoch_)
    optimizer = DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                     compression=compression, bucket_bytes=cfg.bucket_bytes,
                                     small_tensor_bytes=DEFAULT_SMALL_TENSOR_BYTES,
                                     pattern=cfg.pattern)
    return DistributedStep(optimizer, gradient_bytes, hvd.size(), horovod_baseline=False)


def is_horovod_baseline(cfg: TrainConfig) -> bool:
    return cfg.algorithm == "psgd" and cfg.up == "none" and cfg.down == "none"


def make_compression(cfg: TrainConfig, world_size: int, rank: int,
                     steps_per_epoch_: Optional[int] = None):
    """``hvdcomp.Compression.algorithm(name, up=, down=, **hyperparameters)`` for ``cfg``.

    Fills what the training run knows and the user need not type: LIEC's ``period``; DGC's
    ``steps_per_epoch`` (its sparsity warm-up counts epochs); EF21-PP's ``rank`` and ``seed``
    (the shared draw of participants); EF21-W's (and EF21-W-PP's) ``rank`` and, when not
    given, equal ``smoothness`` constants (uniform weights: EF21-W then equals EF21; pass
    ``--algorithm-option smoothness=[L_1,...,L_N]`` for per-worker constants). The CLI calls
    this before hvd.init too, so bad hyperparameters fail before any rank starts."""
    from hvdcomp.compression import Compression
    options = dict(cfg.algorithm_options)
    if cfg.algorithm == "liec":
        options.setdefault("period", cfg.period)
    if cfg.algorithm == "dgc" and steps_per_epoch_ is not None:
        options.setdefault("steps_per_epoch", steps_per_epoch_)
    if cfg.algorithm == "dgc" and options.get("per_layer", True) and cfg.pattern != "allgather":
        raise ValueError(f"per-layer top-k (the paper's, the default) needs the whole bucket, "
                         f"i.e. --pattern allgather, not {cfg.pattern!r}; pass "
                         "--algorithm-option per_layer=false to select per bucket or chunk")
    if cfg.algorithm in ("ef21w", "ef21wpp"):
        options.setdefault("smoothness", [1.0] * world_size)
        options.setdefault("rank", rank)
    if cfg.algorithm in ("ef21pp", "ef21wpp"):
        # EF21-PP's draw of the participating workers: every rank knows its rank and the seed
        options.setdefault("rank", rank)
        options.setdefault("seed", cfg.seed)
    return Compression.algorithm(cfg.algorithm, up=cfg.up, down=cfg.down, **options)


class DistributedStep:
    """The training loop's view of a distributed optimizer: zero_grad, step (timed), lr,
    counters and state. Horovod's optimizer reports no bytes: for it they are computed from the
    ring allreduce it runs ((N−1)/N of the dense gradient each way per step)."""

    def __init__(self, optimizer, gradient_bytes: int, world_size: int, horovod_baseline: bool):
        self.optimizer = optimizer
        self.gradient_bytes = gradient_bytes
        self.world_size = world_size
        self.horovod_baseline = horovod_baseline
        self._measured = {name: 0.0 for name in COUNTERS}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def training_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return labels

    def describe(self) -> Dict[str, Any]:
        from .uncompressed import message_compression   # per uplink message, after a step
        return {} if self.horovod_baseline else message_compression(self.optimizer)

    def step(self) -> None:
        start = time.perf_counter()
        # waits for the exchange the backward hooks started (hvdcomp's own waits are guarded
        # per collective; Horovod's optimizer is guarded as a whole)
        guard = stall.waiting("Horovod's gradient allreduce") if self.horovod_baseline else \
            contextlib.nullcontext()
        with guard:
            self.optimizer.synchronize()
        waited = time.perf_counter() - start
        if self.horovod_baseline:
            self._measured["time_comm"] += waited
            ring_share = (self.world_size - 1) / self.world_size * self.gradient_bytes
            self._measured["bytes_up"] += ring_share
            self._measured["bytes_down"] += ring_share
        with self.optimizer.skip_synchronize():
            self.optimizer.step()

    def counters(self) -> Dict[str, float]:
        """Cumulative bytes sent per rank and seconds spent, since this process started."""
        if self.horovod_baseline:
            return dict(self._measured)
        stats = getattr(self.optimizer, "stats", None)

        def read(name):
            value = stats.get(name, 0.0) if isinstance(stats, dict) else getattr(stats, name, 0.0)
            return float(value)
        return {name: read(name) for name in COUNTERS}

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


# --- schedule -------------------------------------------------------------------------------------
def learning_rate(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch_: int) -> float:
    """lr for 0-based ``step``: linear warm-up from lr/warmup_steps to lr over
    ``warmup_epochs``, then constant, step decay (×0.1 at each milestone fraction of training)
    or cosine annealing to 0 over the remaining steps (Loshchilov & Hutter 2017, no restarts)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch_))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        passed = sum(step >= int(m * total_steps) for m in cfg.milestones)
        return cfg.lr * 0.1 ** passed
    span = max(1, total_steps - warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


# --- evaluation -----------------------------------------------------------------------------------
def blocking(name: str, collective, *args, **kwargs):
    """``collective(*args, name=name, **kwargs)`` (a blocking hvd call) under the stall guard."""
    with stall.waiting(repr(name)):
        return collective(*args, name=name, **kwargs)


def average_state_over_ranks(model: torch.nn.Module, hvd, tag: str) -> None:
    """Replace every floating parameter and buffer by its mean over ranks (in place)."""
    handles = [hvd.allreduce_async_(tensor.data, op=hvd.Average, name=f"hvdcomp.train.{tag}.{name}")
               for name, tensor in model.state_dict(keep_vars=True).items()
               if tensor.is_floating_point()]
    with stall.waiting(repr(f"hvdcomp.train.{tag}.*")):
        for handle in handles:
            hvd.synchronize(handle)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, hvd, device: torch.device, tag: str,
             batch_size: int = 512) -> Dict[str, float]:
    """Test loss and accuracy of the model averaged over ranks; every rank's own state is
    restored afterwards."""
    world = hvd.size()
    own_state = None
    if world > 1:
        own_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        average_state_over_ranks(model, hvd, tag)
    model.eval()
    indices = eval_indices(len(dataset.test_y), hvd.rank(), world)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for start in range(0, len(indices), batch_size):
        x, y = dataset.batch("test", indices[start:start + batch_size])
        x, y = x.to(device), y.to(device)
        logits = model(x)
        totals[0] += F.cross_entropy(logits, y, reduction="sum").item()
        totals[1] += (logits.argmax(1) == y).sum().item()
        totals[2] += len(y)
    totals = blocking(f"hvdcomp.train.{tag}.totals", hvd.allreduce, totals, op=hvd.Sum)
    model.train()
    if own_state is not None:
        model.load_state_dict(own_state)
    return {"test_loss": float(totals[0] / totals[2]), "test_accuracy": float(totals[1] / totals[2])}


# --- the loop -------------------------------------------------------------------------------------
def _load_and_agree(cfg: TrainConfig, hvd, resume_state, stop_after_steps):
    """This rank's data, then the agreement of :mod:`.agreement`: the first collective of the
    run, before which no rank may differ in anything that shapes the collectives."""
    rank, world = hvd.rank(), hvd.size()
    problem, dataset, shard, spe, facts = None, None, None, 0, {}
    try:
        dataset = load_dataset(cfg.dataset, cfg.data_dir)
        shard = shard_indices(dataset.train_y, world, cfg.seed, cfg.non_iid_alpha)[rank]
        spe = steps_per_epoch(len(dataset.train_y), world, cfg.batch_size)
        facts = {"train_samples": len(dataset.train_y), "test_samples": len(dataset.test_y),
                 "classes": dataset.num_classes, "input_shape": list(dataset.input_shape)}
    except UserError as exc:
        problem = str(exc)
    settle(hvd, problem, settings_of(
        cfg, world_size=world, **facts, stop_after_steps=stop_after_steps,
        resume_step=None if resume_state is None else int(resume_state["step"])))
    return dataset, shard, spe


def run(cfg: TrainConfig, out_dir: Path, launcher: Dict[str, Any], *, resume_state:
        Optional[Dict[str, Any]] = None, quiet: bool = False,
        stop_after_steps: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """Train with ``cfg`` (already resolved and validated); returns the summary on rank 0."""
    import horovod.torch as hvd
    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    if "OMP_NUM_THREADS" not in os.environ:
        # ranks on one node share its cores; oversubscribed threads slow everyone down
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, hvd.local_size())))
    device = torch.device("cpu")
    if cfg.device == "cuda":
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())

    dataset, shard, spe = _load_and_agree(cfg, hvd, resume_state, stop_after_steps)
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * spe
    ckpt_every = parse_checkpoint_every(cfg.checkpoint_every) if cfg.checkpoint_every else None

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, dataset.input_shape, dataset.num_classes).to(device)
    dist = build_distributed_optimizer(model, cfg, hvd, spe)

    progress: Dict[str, Any] = {"wall_time": 0.0, "time_compute": 0.0, "best_accuracy": 0.0,
                                "epoch_loss": 0.0, "epoch_correct": 0.0, "epoch_seen": 0.0,
                                "window_loss": 0.0, "window_steps": 0.0,
                                **{f"offset_{k}": 0.0 for k in COUNTERS}}
    start_step = 0
    if resume_state is not None:
        mine = resume_state["ranks"][rank]
        model.load_state_dict(mine["model"])
        dist.load_state_dict(mine["optimizer"])
        ckpt.set_rng_state(mine["rng"])
        # this rank's own running sums (loss, accuracy, bytes); checkpoints from before they
        # were kept per rank hold rank 0's only
        saved = mine.get("progress", resume_state["progress"])
        progress.update(saved)
        start_step = int(resume_state["step"])
        # Counters continue from the checkpoint: whatever the optimizer restored itself is
        # subtracted so that nothing is counted twice.
        restored = dist.counters()
        for k in COUNTERS:
            progress[f"offset_{k}"] = saved[f"total_{k}"] - restored[k]
    else:
        with stall.waiting("hvd.broadcast_parameters"):
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    run_dir = None
    config_record = {**cfg.to_dict(), "out": str(out_dir), "world_size": world,
                     "launcher": launcher["name"], **dist.describe()}
    if rank == 0:
        run_dir = RunDirectory(out_dir)
        run_dir.start(config_record, environment_facts(world, launcher),
                      resume_step=start_step if resume_state is not None else None)
    clock_start = time.perf_counter()

    def totals() -> Dict[str, float]:
        current = dist.counters()
        return {k: current[k] + progress[f"offset_{k}"] for k in COUNTERS}

    def wall() -> float:
        return progress["wall_time"] + time.perf_counter() - clock_start

    def base_record(event: str, step: int) -> Dict[str, Any]:
        counted = totals()
        return {"event": event, "step": step, "epoch": step / spe, "wall_time": wall(),
                "samples": step * cfg.batch_size * world, "time_compute": progress["time_compute"],
                **counted}

    def save(step: int) -> None:
        counted = totals()
        # every rank's own running sums travel with its state, so that a resume restores them
        # (rank 0's alone would give every rank rank 0's partial loss and accuracy)
        own_progress = {**progress, "wall_time": wall(),
                        **{f"total_{k}": v for k, v in counted.items()}}
        mine = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "optimizer": dist.state_dict(), "rng": ckpt.rng_state(),
                "progress": own_progress}
        everyone = blocking(f"hvdcomp.train.ckpt.{step}", hvd.allgather_object, mine)
        if rank == 0:
            ckpt.save_checkpoint(run_dir.checkpoints,
                                 {"step": step, "epoch": step // spe, "step_in_epoch": step % spe,
                                  "config": cfg.to_dict(), "world_size": world, "ranks": everyone,
                                  "progress": own_progress}, keep=cfg.keep_checkpoints)

    bar = ProgressReporter(enabled=rank == 0 and not quiet, total=total_steps, done=start_step,
                           steps_per_epoch=spe)
    order, order_epoch = None, -1
    last_eval: Dict[str, float] = {}
    model.train()
    try:
        for step in range(start_step, total_steps):
            stall.note(f"step {step + 1} of {total_steps}")
            epoch, position = divmod(step, spe)
            if order_epoch != epoch:
                order = epoch_order(shard, spe * cfg.batch_size, cfg.seed, rank, epoch)
                order_epoch = epoch
            batch_idx = order[position * cfg.batch_size:(position + 1) * cfg.batch_size]
            aug = augment_generator(cfg.seed, rank, epoch, position) if cfg.augment else None
            x, y = dataset.batch("train", batch_idx, aug)
            x, y = x.to(device), dist.training_labels(y, dataset.num_classes).to(device)
            dist.set_lr(learning_rate(cfg, step, total_steps, spe))

            before = totals()
            started = time.perf_counter()
            dist.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                # Stop before a NaN reaches the exchange: every rank's error buffers would carry
                # it for ever, and Horovod's own allreduce would spread it silently.
                raise TrainingFailed(
                    f"loss is {loss.item()} at step {step} on rank {rank}: training diverged; "
                    f"lower --lr (now {cfg.lr}), add --warmup-epochs, or resume from an earlier "
                    "checkpoint with a smaller learning rate")
            loss.backward()
            dist.step()
            elapsed = time.perf_counter() - started
            after = totals()
            # compute = the step's wall time less what the optimizer spent compressing and waiting
            progress["time_compute"] += max(0.0, elapsed - (after["time_compress"] - before[
                "time_compress"]) - (after["time_comm"] - before["time_comm"]))

            progress["window_loss"] += loss.item()
            progress["window_steps"] += 1
            progress["epoch_loss"] += loss.item() * len(y)
            progress["epoch_correct"] += (logits.argmax(1) == y).sum().item()
            progress["epoch_seen"] += len(y)
            done = step + 1
            bar.advance(loss.item())

            if done % cfg.log_every == 0 or done == total_steps:
                mean_loss = blocking(f"hvdcomp.train.loss.{done}", hvd.allreduce,
                                     torch.tensor([progress["window_loss"]
                                                   / progress["window_steps"]]), op=hvd.Average)
                progress["window_loss"], progress["window_steps"] = 0.0, 0.0
                if rank == 0:
                    run_dir.log({**base_record("step", done), "loss": float(mean_loss),
                                 "lr": dist.optimizer.param_groups[0]["lr"]})

            epoch_end = done % spe == 0 or done == total_steps
            if epoch_end:
                sums = blocking(f"hvdcomp.train.epoch.{done}", hvd.allreduce,
                                torch.tensor([progress["epoch_loss"], progress["epoch_correct"],
                                              progress["epoch_seen"]], dtype=torch.float64),
                                op=hvd.Sum)
                last_eval = evaluate(model, dataset, hvd, device, tag=f"eval.{done}")
                progress["best_accuracy"] = max(progress["best_accuracy"],
                                                last_eval["test_accuracy"])
                progress["epoch_loss"] = progress["epoch_correct"] = progress["epoch_seen"] = 0.0
                if rank == 0:
                    record = {**base_record("epoch", done), "loss": float(sums[0] / sums[2]),
                              "train_accuracy": float(sums[1] / sums[2]), **last_eval}
                    run_dir.log(record)
                    bar.epoch_line(record, quiet)

            if ckpt_every is not None:
                count, unit = ckpt_every
                due = (unit == "step" and done % count == 0) or (
                    unit == "epoch" and done % spe == 0 and (done // spe) % count == 0)
                if due or done == total_steps:
                    save(done)

            if stop_after_steps is not None and done >= stop_after_steps and done < total_steps:
                bar.close()
                print(f"hvdcomp train: rank {rank} stopping after {done} steps "
                      "(--stop-after-steps), exiting like a crash", file=sys.stderr, flush=True)
                if run_dir is not None:
                    run_dir.close()
                os._exit(STOPPED_EXIT_CODE)  # no MPI finalize, no summary: as if killed
    finally:
        bar.close()

    if not last_eval:  # resumed from the final checkpoint: nothing left to train
        last_eval = evaluate(model, dataset, hvd, device, tag="eval.final")
    counted = totals()
    wall_time = wall()
    summary = {
        "status": "completed",
        "final_accuracy": last_eval.get("test_accuracy", float("nan")),
        "final_test_loss": last_eval.get("test_loss", float("nan")),
        "best_accuracy": progress["best_accuracy"],
        "wall_time": wall_time,
        "steps": total_steps,
        "epochs": total_steps / spe,
        "samples_per_s": total_steps * cfg.batch_size * world / max(wall_time, 1e-9),
        "time_compute": progress["time_compute"],
        "gradient_bytes_per_step": dist.gradient_bytes,
        "compression_ratio": compression_ratio(dist.gradient_bytes, world, total_steps,
                                               counted["bytes_up"], counted["bytes_down"]),
        "world_size": world,
        "run_dir": str(out_dir),
        **dist.describe(),   # MoNNA: simulated faulty ranks, named in the results
        **counted,
    }
    if rank == 0:
        run_dir.finish(summary)
        print_summary(summary, config_record)
        return summary
    return None

