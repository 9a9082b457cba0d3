"""The training loop's per-step numbers on a GPU (marker ``gpu``; skipped without CUDA): recording
a step makes the host wait for nothing, and the sums read later equal the old per-step
``.item()`` reads of the same CUDA tensors bit for bit (CPU side: tests/test_step_metrics.py)."""
from __future__ import annotations

import torch

from hvdcomp.train.step_metrics import StepMetrics

from gpu_support import GPU_MARKS, no_host_sync

pytestmark = GPU_MARKS

KEYS = ("window_loss", "window_steps", "epoch_loss", "epoch_correct", "epoch_seen")


def cuda_steps(count: int, batch: int = 64):
    gen = torch.Generator().manual_seed(5)
    for step in range(count):
        logits = torch.randn(batch, 10, generator=gen).cuda()
        labels = torch.randint(0, 10, (batch,), generator=gen).cuda()
        yield step, torch.nn.functional.cross_entropy(logits, labels), logits, labels


def test_recording_steps_never_waits_and_the_sums_are_the_per_step_reads():
    data = list(cuda_steps(20))
    expected = {key: 0.0 for key in KEYS}
    for _, loss, logits, y in data:
        expected["window_loss"] += loss.item()
        expected["window_steps"] += 1
        expected["epoch_loss"] += loss.item() * len(y)
        expected["epoch_correct"] += (logits.argmax(1) == y).sum().item()
        expected["epoch_seen"] += len(y)
    metrics = StepMetrics(torch.device("cuda"), rank=0)
    assert not metrics.every_step
    progress = {key: 0.0 for key in KEYS}
    step, loss, logits, y = data[0]
    metrics.add(step, loss, logits, y, progress, lr=0.1)      # the first step is read at once
    with no_host_sync():
        for step, loss, logits, y in data[1:]:
            metrics.check_before_backward(step, loss, lr=0.1)
            metrics.add(step, loss, logits, y, progress, lr=0.1)
    metrics.read(progress, lr=0.1)
    assert progress == expected
