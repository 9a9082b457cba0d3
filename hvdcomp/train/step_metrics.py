"""The training loop's per-step numbers (loss, correct predictions) and its diverged-loss check,
read on the host only when the loop needs them.

On a GPU every ``.item()`` (or ``bool(tensor)``) makes the host wait until the device has
finished everything queued so far: read each step, the loss, the accuracy count and the finite
check cost 4-5 such waits per step, and the host can never queue the next step while the device
works on this one. So on a GPU the step's tensors are kept as they are, and :meth:`StepMetrics.read`
turns them into the running sums at once, when the loop needs the sums anyway: a step record
(every ``--log-every`` steps), the end of an epoch, a checkpoint -- and at least every
:data:`MOST_PENDING` steps. On the CPU reading costs nothing, so it reads every step and a
diverged loss stops the run before its backward pass, as it always did.

The sums are the same floats either way: :meth:`read` adds the pending steps one by one, in
step order, exactly as the loop used to add each ``loss.item()``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..compressors import base as compressor_base
from .config import TrainingFailed

#: steps whose numbers may wait on the device before they are read (a bound on the memory they
#: hold; one read per this many steps costs nothing noticeable)
MOST_PENDING = 256


def diverged(loss: float, step: int, rank: int, lr: float, seen_at: Optional[int] = None):
    """The error that stops a run whose loss is NaN or Inf."""
    late = "" if seen_at is None else f" (read at step {seen_at})"
    return TrainingFailed(
        f"loss is {loss} at step {step} on rank {rank}{late}: training diverged; lower --lr "
        f"(now {lr}), add --warmup-epochs, or resume from an earlier checkpoint with a smaller "
        "learning rate")


class StepMetrics:
    """Pending per-step numbers of one rank; ``every_step``: read at each step (default: on the
    CPU, where reading does not wait for a device)."""

    def __init__(self, device: torch.device, rank: int, every_step: Optional[bool] = None):
        self.every_step = torch.device(device).type == "cpu" if every_step is None \
            else bool(every_step)
        self.rank = rank
        #: (step, loss, correct predictions, batch size); tensors still on the device
        self._pending: List[Tuple[int, torch.Tensor, torch.Tensor, int]] = []
        #: the loss of the last step read (what the progress bar shows)
        self.latest: Optional[float] = None

    def check_before_backward(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """Reading every step: stop before a NaN/Inf loss reaches the exchange (every rank's
        error buffers would carry it for ever, and a dense allreduce would spread it
        silently). Deferred: nothing here; :meth:`read` raises for it instead."""
        if self.every_step and not torch.isfinite(loss):
            raise diverged(loss.item(), step, self.rank, lr)

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
            progress: Dict[str, float], lr: float) -> Optional[float]:
        """Record one step (after the optimizer step); reads when due. Returns the latest loss
        read, for the progress bar."""
        correct = (logits.detach().argmax(1) == labels).sum()
        self._pending.append((step, loss.detach(), correct, len(labels)))
        if self.every_step or self.latest is None or len(self._pending) >= MOST_PENDING:
            self.read(progress, lr)
        return self.latest

    def read(self, progress: Dict[str, float], lr: float) -> None:
        """Add the pending steps to ``progress`` (``window_loss``, ``window_steps``,
        ``epoch_loss``, ``epoch_correct``, ``epoch_seen``) in step order: one wait for the
        device. Raises :class:`TrainingFailed` for the first NaN/Inf loss among them, and the
        compressors' deferred finite check (``raise_if_nonfinite``)."""
        pending, self._pending = self._pending, []
        if pending:
            losses = torch.stack([loss for _, loss, _, _ in pending]).tolist()
            counts = torch.stack([count for _, _, count, _ in pending]).tolist()
            last_step = pending[-1][0]
            for (step, _, _, size), loss, correct in zip(pending, losses, counts):
                if loss != loss or loss in (float("inf"), float("-inf")):
                    raise diverged(loss, step, self.rank, lr,
                                   None if step == last_step else last_step)
                progress["window_loss"] += loss
                progress["window_steps"] += 1
                progress["epoch_loss"] += loss * size
                progress["epoch_correct"] += correct
                progress["epoch_seen"] += size
            self.latest = losses[-1]
        compressor_base.raise_if_nonfinite()
