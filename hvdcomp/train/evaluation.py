"""Evaluation of the model averaged over ranks, and the loop's metric collectives.

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

Every collective here goes through the engine's communicator (:mod:`hvdcomp.comm`) and waits
under the stall guard (:meth:`hvdcomp.comm.base.Handle.wait`).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from .data import Dataset, eval_indices


def mean_over_ranks(values: Sequence[float], comm, name: str) -> torch.Tensor:
    """The float32 mean over ranks of this rank's ``values`` (blocking)."""
    return comm.allreduce(torch.tensor(list(values)), name, op="average")


def sum_over_ranks(values: Sequence[float], comm, name: str) -> torch.Tensor:
    """The float64 sum over ranks of this rank's ``values`` (blocking)."""
    return comm.allreduce(torch.tensor(list(values), dtype=torch.float64), name, op="sum")


def average_state_over_ranks(model: torch.nn.Module, comm, tag: str) -> None:
    """Replace every floating parameter and buffer by its mean over ranks (in place)."""
    pending = [(tensor, comm.allreduce_async(tensor.detach(), f"hvdcomp.train.{tag}.{name}",
                                             "average"))
               for name, tensor in model.state_dict(keep_vars=True).items()
               if tensor.is_floating_point()]
    with torch.no_grad():
        for tensor, handle in pending:
            tensor.copy_(handle.wait())


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, comm, device: torch.device, tag: str,
             batch_size: int = 512) -> Dict[str, float]:
    """Test loss and accuracy of the model averaged over ranks; every rank's own state is
    restored afterwards."""
    own_state = None
    if comm.size > 1:
        own_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        average_state_over_ranks(model, comm, tag)
    model.eval()
    indices = eval_indices(len(dataset.test_y), comm.rank, comm.size)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for start in range(0, len(indices), batch_size):
        x, y = dataset.batch("test", indices[start:start + batch_size])
        x, y = x.to(device), y.to(device)
        logits = model(x)
        totals[0] += F.cross_entropy(logits, y, reduction="sum").item()
        totals[1] += (logits.argmax(1) == y).sum().item()
        totals[2] += len(y)
    totals = comm.allreduce(totals, f"hvdcomp.train.{tag}.totals", op="sum")
    model.train()
    if own_state is not None:
        model.load_state_dict(own_state)
    return {"test_loss": float(totals[0] / totals[2]),
            "test_accuracy": float(totals[1] / totals[2])}
