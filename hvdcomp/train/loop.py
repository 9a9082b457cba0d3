"""The data-parallel training loop behind ``hvdcomp train``.

One process per rank (mpirun, srun, horovodrun, torchrun, or a lone process). The loop speaks
only to a communicator (:mod:`hvdcomp.comm`), started by the engine of ``--engine``
(:mod:`.engine`: Horovod or torch.distributed). Each step every rank:

1. takes its next batch (its own shard; order and augmentation seeded by (seed, rank, epoch,
   step), see :mod:`.data`),
2. runs forward and backward; the distributed optimizer's hooks start the exchange,
3. ``DistributedStep.step()``: waits for the exchange, applies LIEC-style exact model averaging
   when the optimizer asks for it, then the SGD update (momentum, weight decay).

Evaluation uses the model averaged over ranks (:mod:`.evaluation`); checkpoints are one shard per
rank plus rank 0's manifest (:mod:`.checkpoint`); which distributed optimizer runs is decided in
:mod:`.distributed` alone.
"""
from __future__ import annotations

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
from ..horovod_settings import apply_train_defaults, settings_in_force
from ..threads import share_cores
from . import checkpoint as ckpt
from . import engine
from .agreement import settings_of, settle
from .config import TrainConfig, parse_checkpoint_every
from .data import (augment_generator, epoch_order, load_dataset, shard_indices,
                   steps_per_epoch)
# re-exported: the CLI and tests import these from here
from .distributed import (COUNTERS, DistributedStep, build_distributed_optimizer,  # noqa: F401
                          is_dense_baseline, is_horovod_baseline, make_compression)
from .evaluation import average_state_over_ranks, evaluate, mean_over_ranks  # noqa: F401
from .evaluation import sum_over_ranks
from .models import build_model
from .progress import ProgressReporter
from .results import RunDirectory, compression_ratio, environment_facts, print_summary
from .step_metrics import StepMetrics

#: Exit status of a run stopped by --stop-after-steps (it exits like a crash: no summary).
STOPPED_EXIT_CODE = 3


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


# --- the loop -------------------------------------------------------------------------------------
def _load_and_agree(cfg: TrainConfig, comm, resume_state, stop_after_steps):
    """This rank's data, then the agreement of :mod:`.agreement`: the first collective of the
    run, before which no rank may differ in anything that shapes the collectives."""
    rank, world = comm.rank, comm.size
    problem, dataset, shard, spe, facts = None, None, None, 0, {}
    try:
        dataset = load_dataset(cfg.dataset, cfg.data_dir)
        shard = shard_indices(dataset.train_y, world, cfg.seed, cfg.non_iid_alpha)[rank]
        spe = steps_per_epoch(len(dataset.train_y), world, cfg.batch_size)
        facts = {"train_samples": len(dataset.train_y), "test_samples": len(dataset.test_y),
                 "classes": dataset.num_classes, "input_shape": list(dataset.input_shape)}
    except UserError as exc:
        problem = str(exc)
    settle(comm, problem, settings_of(
        cfg, world_size=world, **facts, stop_after_steps=stop_after_steps,
        resume_step=None if resume_state is None else int(resume_state["step"])))
    return dataset, shard, spe


def _fresh_progress() -> Dict[str, Any]:
    return {"wall_time": 0.0, "time_compute": 0.0, "best_accuracy": 0.0,
            "epoch_loss": 0.0, "epoch_correct": 0.0, "epoch_seen": 0.0,
            "window_loss": 0.0, "window_steps": 0.0, **{f"offset_{k}": 0.0 for k in COUNTERS}}


class _Training:
    """One rank's run: the model, its distributed optimizer, running sums and the run directory
    (rank 0); :meth:`step` is one optimizer step, the others are what follows a step."""

    def __init__(self, cfg: TrainConfig, comm, device: torch.device, dataset, shard, spe: int,
                 out_dir: Path, quiet: bool):
        self.cfg, self.comm, self.device, self.quiet = cfg, comm, device, quiet
        self.out_dir = Path(out_dir)
        self.dataset, self.shard, self.spe = dataset, shard, spe
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * spe
        self.ckpt_every = parse_checkpoint_every(cfg.checkpoint_every) \
            if cfg.checkpoint_every else None
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, dataset.input_shape, dataset.num_classes).to(device)
        self.dist = build_distributed_optimizer(self.model, cfg, comm, spe)
        self.progress = _fresh_progress()
        self.metrics = StepMetrics(device, comm.rank)
        self.start_step = 0
        self.run_dir: Optional[RunDirectory] = None
        self.last_eval: Dict[str, float] = {}
        self.clock_start = time.perf_counter()
        self._order, self._order_epoch = None, -1

    # --- state ---------------------------------------------------------------------------------
    def restore(self, resume_state: Optional[Dict[str, Any]]) -> None:
        """This rank's shard of the checkpoint, or rank 0's parameters on every rank."""
        if resume_state is None:
            self.comm.broadcast_state(self.model.state_dict(), 0, "hvdcomp.train.parameters")
            return
        mine = resume_state["mine"]
        self.model.load_state_dict(mine["model"])
        self.dist.load_state_dict(mine["optimizer"])
        ckpt.set_rng_state(mine["rng"])
        # this rank's own running sums (loss, accuracy, bytes); checkpoints from before they
        # were kept per rank hold rank 0's only
        saved = mine.get("progress", resume_state["progress"])
        self.progress.update(saved)
        self.start_step = int(resume_state["step"])
        # Counters continue from the checkpoint: whatever the optimizer restored itself is
        # subtracted so that nothing is counted twice.
        restored = self.dist.counters()
        for k in COUNTERS:
            self.progress[f"offset_{k}"] = saved[f"total_{k}"] - restored[k]

    def totals(self) -> Dict[str, float]:
        current = self.dist.counters()
        return {k: current[k] + self.progress[f"offset_{k}"] for k in COUNTERS}

    def wall(self) -> float:
        return self.progress["wall_time"] + time.perf_counter() - self.clock_start

    def base_record(self, event: str, step: int) -> Dict[str, Any]:
        return {"event": event, "step": step, "epoch": step / self.spe, "wall_time": self.wall(),
                "samples": step * self.cfg.batch_size * self.comm.size,
                "time_compute": self.progress["time_compute"], **self.totals()}

    def save(self, step: int) -> None:
        """A checkpoint: this rank's shard, and rank 0's manifest once every shard is on disk."""
        # every rank's own running sums travel with its state, so that a resume restores them
        # (rank 0's alone would give every rank rank 0's partial loss and accuracy)
        self.metrics.read(self.progress, self.cfg.lr)
        own_progress = {**self.progress, "wall_time": self.wall(),
                        **{f"total_{k}": v for k, v in self.totals().items()}}
        mine = {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.dist.state_dict(), "rng": ckpt.rng_state(),
                "progress": own_progress}
        manifest = {"epoch": step // self.spe, "step_in_epoch": step % self.spe,
                    "config": self.cfg.to_dict(), "progress": own_progress}
        directory = self.out_dir / "checkpoints"     # RunDirectory.checkpoints, on every rank
        ckpt.save_sharded(self.comm, directory, step, mine, manifest,
                          keep=self.cfg.keep_checkpoints)

    # --- one step ------------------------------------------------------------------------------
    def batch(self, step: int):
        cfg = self.cfg
        epoch, position = divmod(step, self.spe)
        if self._order_epoch != epoch:
            self._order = epoch_order(self.shard, self.spe * cfg.batch_size, cfg.seed,
                                      self.comm.rank, epoch)
            self._order_epoch = epoch
        batch_idx = self._order[position * cfg.batch_size:(position + 1) * cfg.batch_size]
        aug = augment_generator(cfg.seed, self.comm.rank, epoch, position) if cfg.augment \
            else None
        x, y = self.dataset.batch("train", batch_idx, aug)
        return x.to(self.device), \
            self.dist.training_labels(y, self.dataset.num_classes).to(self.device)

    def step(self, step: int) -> float:
        """One optimizer step; returns its loss."""
        x, y = self.batch(step)
        dist, progress = self.dist, self.progress
        dist.set_lr(learning_rate(self.cfg, step, self.total_steps, self.spe))
        before = self.totals()
        started = time.perf_counter()
        dist.zero_grad()
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.metrics.check_before_backward(step, loss, self.cfg.lr)
        loss.backward()
        dist.step()
        elapsed = time.perf_counter() - started
        after = self.totals()
        # compute = the step's wall time less what the optimizer spent compressing and waiting
        progress["time_compute"] += max(0.0, elapsed - (after["time_compress"] - before[
            "time_compress"]) - (after["time_comm"] - before["time_comm"]))
        # the running sums, read on the host when due (each step on the CPU; see step_metrics)
        return self.metrics.add(step, loss, logits, y, progress, self.cfg.lr)

    # --- after a step --------------------------------------------------------------------------
    def log_window(self, done: int) -> None:
        """The mean loss over ranks of the steps since the last step record."""
        progress = self.progress
        self.metrics.read(progress, self.cfg.lr)
        mean_loss = mean_over_ranks([progress["window_loss"] / progress["window_steps"]],
                                    self.comm, f"hvdcomp.train.loss.{done}")
        progress["window_loss"], progress["window_steps"] = 0.0, 0.0
        if self.run_dir is not None:
            self.run_dir.log({**self.base_record("step", done), "loss": float(mean_loss),
                              "lr": self.dist.optimizer.param_groups[0]["lr"]})

    def end_epoch(self, done: int, bar: ProgressReporter) -> None:
        progress = self.progress
        self.metrics.read(progress, self.cfg.lr)
        sums = sum_over_ranks([progress["epoch_loss"], progress["epoch_correct"],
                               progress["epoch_seen"]], self.comm, f"hvdcomp.train.epoch.{done}")
        self.last_eval = evaluate(self.model, self.dataset, self.comm, self.device,
                                  tag=f"eval.{done}")
        progress["best_accuracy"] = max(progress["best_accuracy"],
                                        self.last_eval["test_accuracy"])
        progress["epoch_loss"] = progress["epoch_correct"] = progress["epoch_seen"] = 0.0
        if self.run_dir is not None:
            record = {**self.base_record("epoch", done), "loss": float(sums[0] / sums[2]),
                      "train_accuracy": float(sums[1] / sums[2]), **self.last_eval}
            self.run_dir.log(record)
            bar.epoch_line(record, self.quiet)

    def checkpoint_due(self, done: int) -> bool:
        if self.ckpt_every is None:
            return False
        count, unit = self.ckpt_every
        due = (unit == "step" and done % count == 0) or (
            unit == "epoch" and done % self.spe == 0 and (done // self.spe) % count == 0)
        return due or done == self.total_steps

    def summary(self) -> Dict[str, Any]:
        if not self.last_eval:  # resumed from the final checkpoint: nothing left to train
            self.last_eval = evaluate(self.model, self.dataset, self.comm, self.device,
                                      tag="eval.final")
        counted, wall_time, world = self.totals(), self.wall(), self.comm.size
        steps, dist = self.total_steps, self.dist
        return {
            "status": "completed",
            "final_accuracy": self.last_eval.get("test_accuracy", float("nan")),
            "final_test_loss": self.last_eval.get("test_loss", float("nan")),
            "best_accuracy": self.progress["best_accuracy"],
            "wall_time": wall_time,
            "steps": steps,
            "epochs": steps / self.spe,
            "samples_per_s": steps * self.cfg.batch_size * world / max(wall_time, 1e-9),
            "time_compute": self.progress["time_compute"],
            "gradient_bytes_per_step": dist.gradient_bytes,
            "compression_ratio": compression_ratio(dist.gradient_bytes, world, steps,
                                                   counted["bytes_up"], counted["bytes_down"]),
            "world_size": world,
            "run_dir": str(self.out_dir),
            **dist.describe(),   # MoNNA: simulated faulty ranks, named in the results
            **counted,
        }


def _stop_like_a_crash(training: _Training, done: int, bar: ProgressReporter) -> None:
    """--stop-after-steps: exit at once, no summary, no finalize: as if killed."""
    bar.close()
    print(f"hvdcomp train: rank {training.comm.rank} stopping after {done} steps "
          "(--stop-after-steps), exiting like a crash", file=sys.stderr, flush=True)
    if training.run_dir is not None:
        training.run_dir.close()
    os._exit(STOPPED_EXIT_CODE)


def _train(training: _Training, bar: ProgressReporter, stop_after_steps: Optional[int]) -> None:
    cfg, spe, total = training.cfg, training.spe, training.total_steps
    training.model.train()
    for step in range(training.start_step, total):
        stall.note(f"step {step + 1} of {total}")
        bar.advance(training.step(step))
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            training.log_window(done)
        if done % spe == 0 or done == total:
            training.end_epoch(done, bar)
        if training.checkpoint_due(done):
            training.save(done)
        if stop_after_steps is not None and stop_after_steps <= done < total:
            _stop_like_a_crash(training, done, bar)


def _device_for(cfg: TrainConfig, comm) -> torch.device:
    share_cores(comm.local_size)
    if cfg.device == "cuda":
        torch.cuda.set_device(comm.local_rank)
        return torch.device("cuda", comm.local_rank)
    return torch.device("cpu")


def run(cfg: TrainConfig, out_dir: Path, launcher: Dict[str, Any], *, resume_state:
        Optional[Dict[str, Any]] = None, quiet: bool = False,
        stop_after_steps: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """Train with ``cfg`` (already resolved and validated, ``cfg.engine`` chosen); returns the
    summary on rank 0. ``resume_state``: :func:`.checkpoint.load_for_rank` of this rank."""
    chosen = cfg.engine or engine.default_engine(launcher)
    # before hvd.init(): Horovod reads its settings once (hvdcomp.horovod_settings)
    applied = apply_train_defaults(cfg.device) if chosen == "horovod" else None
    comm = engine.start(chosen, launcher, cfg.device)
    device = _device_for(cfg, comm)
    dataset, shard, spe = _load_and_agree(cfg, comm, resume_state, stop_after_steps)
    training = _Training(cfg, comm, device, dataset, shard, spe, out_dir, quiet)
    training.restore(resume_state)

    config_record = {**cfg.to_dict(), "out": str(out_dir), "world_size": comm.size,
                     "launcher": launcher["name"], **training.dist.describe()}
    facts = {}           # for env.json and the summary, not config.json (not an option)
    if applied is not None:
        facts["horovod_settings"] = settings_in_force(
            applied=applied, applied_by="hvdcomp train default (CPU)")
    if comm.rank == 0:
        training.run_dir = RunDirectory(out_dir)
        training.run_dir.start(config_record, {**environment_facts(comm.size, launcher), **facts},
                               resume_step=training.start_step if resume_state is not None
                               else None)
    training.clock_start = time.perf_counter()
    bar = ProgressReporter(enabled=comm.rank == 0 and not quiet, total=training.total_steps,
                           done=training.start_step, steps_per_epoch=spe)
    try:
        _train(training, bar, stop_after_steps)
    finally:
        bar.close()
    summary = training.summary()
    engine.stop(comm)
    if comm.rank == 0:
        training.run_dir.finish(summary)
        print_summary(summary, {**config_record, **facts})
        return summary
    return None
