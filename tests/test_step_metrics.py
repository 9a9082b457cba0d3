"""The training loop's per-step numbers (hvdcomp/train/step_metrics.py): read late (as on a GPU)
they give the same running sums, bit for bit, as read every step (as on the CPU), and a NaN loss
still stops the run, naming the step it happened at. Its GPU side (no host wait while steps
are recorded): tests/test_gpu_step_metrics.py."""
from __future__ import annotations

import pytest
import torch

from hvdcomp.train.config import TrainingFailed
from hvdcomp.train.step_metrics import MOST_PENDING, StepMetrics

KEYS = ("window_loss", "window_steps", "epoch_loss", "epoch_correct", "epoch_seen")


def fresh(offset: float = 0.0):
    # an offset as after a resume: the sums continue from the checkpoint's floats
    return {key: offset * (i + 1) for i, key in enumerate(KEYS)}


def steps(count: int, seed: int = 0, batch: int = 37):
    gen = torch.Generator().manual_seed(seed)
    for step in range(count):
        logits = torch.randn(batch - step % 3, 10, generator=gen)
        labels = torch.randint(0, 10, (batch - step % 3,), generator=gen)
        yield step, torch.nn.functional.cross_entropy(logits, labels), logits, labels


def old_loop(progress, count, seed=0):
    """What the loop did before: five host reads per step."""
    for _, loss, logits, y in steps(count, seed):
        progress["window_loss"] += loss.item()
        progress["window_steps"] += 1
        progress["epoch_loss"] += loss.item() * len(y)
        progress["epoch_correct"] += (logits.argmax(1) == y).sum().item()
        progress["epoch_seen"] += len(y)


@pytest.mark.parametrize("every_step", [True, False])
def test_sums_equal_the_old_per_step_reads_bit_for_bit(every_step):
    count = MOST_PENDING + 45                    # one forced read on the way when deferred
    expected, got = fresh(0.1), fresh(0.1)
    old_loop(expected, count)
    metrics = StepMetrics(torch.device("cpu"), rank=0, every_step=every_step)
    latest = []
    for step, loss, logits, y in steps(count):
        metrics.check_before_backward(step, loss, lr=0.1)
        latest.append(metrics.add(step, loss, logits, y, got, lr=0.1))
    metrics.read(got, lr=0.1)
    assert got == expected                       # floats compared exactly
    assert all(value is not None for value in latest)
    if every_step:
        assert latest[-1] == list(steps(count))[-1][1].item()


def test_a_nan_loss_stops_the_run_where_it_is_read():
    metrics = StepMetrics(torch.device("cpu"), rank=3, every_step=False)
    progress = fresh()
    for step, loss, logits, y in steps(12):
        metrics.add(step, loss if step != 7 else loss * float("nan"), logits, y, progress, 0.5)
    with pytest.raises(TrainingFailed, match=r"loss is nan at step 7 on rank 3 \(read at step "
                                             r"11\): training diverged; lower --lr \(now 0.5\)"):
        metrics.read(progress, lr=0.5)


def test_reading_every_step_stops_before_the_backward_pass():
    metrics = StepMetrics(torch.device("cpu"), rank=0)      # CPU: every step by default
    assert metrics.every_step
    with pytest.raises(TrainingFailed, match=r"loss is inf at step 4 on rank 0: training "
                                             r"diverged"):
        metrics.check_before_backward(4, torch.tensor(float("inf")), lr=0.1)
    assert not StepMetrics(torch.device("cuda"), rank=0).every_step   # no CUDA needed for this
