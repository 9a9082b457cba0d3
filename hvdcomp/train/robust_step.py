"""MoNNA in the training loop: the :class:`hvdcomp.robust.MoNNA` driver behind the interface the
loop expects of a distributed optimizer (``zero_grad``, ``set_lr``, ``step``, ``counters``,
``state_dict``), so ``hvdcomp train --algorithm monna`` needs no loop of its own.

Options (``--algorithm-option K=V``): ``beta`` (Polyak momentum, default 0.99), ``f`` (faulty
workers tolerated), ``aggregator`` (``nna``, ``trimmed_mean``, ``median``, ``mean``, and MoNNA's
baselines ``krum``, ``rfa``, ``cclip``) with the aggregator's own options (rfa: ``nu``,
``iterations``; cclip: ``radius``, ``iterations``), and for
simulations: ``attack`` (``alie``, ``foe``, ``sign_flip``, ``label_flip``, ``mimic``),
``attack_param``, ``line_search``. Giving an attack turns on the simulation of the last ``f``
ranks as faulty; the
run's config and summary then name them (``faulty_ranks``) and every log says so.
"""
from __future__ import annotations

import time
from typing import Any, Dict

import torch

from hvdcomp.algorithms.monna import MoNNAMethod

#: options of the aggregation rule itself (hvdcomp.robust.aggregators.AGGREGATOR_OPTIONS)
AGGREGATOR_OPTION_NAMES = ("nu", "iterations", "radius")
#: every option MoNNA takes, as its registry entry declares them (hvdcomp/algorithms/monna.py)
MONNA_OPTIONS = tuple(o.name for o in MoNNAMethod.info.options)


class MoNNAStep:
    def __init__(self, model: torch.nn.Module, cfg, comm):
        from hvdcomp.robust import MoNNA

        options = dict(cfg.algorithm_options)
        unknown = sorted(set(options) - set(MONNA_OPTIONS))
        if unknown:
            raise ValueError(f"algorithm 'monna' has no option(s) {', '.join(unknown)}; it "
                             f"accepts: {', '.join(MONNA_OPTIONS)}")
        simulate = options.get("attack") is not None
        aggregator_options = {k: options.pop(k) for k in AGGREGATOR_OPTION_NAMES if k in options}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.weight_decay = cfg.weight_decay
        self.driver = MoNNA(self.params, comm, lr=cfg.lr, simulate_faults=simulate,
                            aggregator_options=aggregator_options, **options)
        self.world_size = comm.size
        # What the loop reads of an optimizer: the learning rate of its (single) group.
        self.param_groups = [{"lr": cfg.lr}]
        self.optimizer = self
        self.gradient_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self.horovod_baseline = False
        self._counters = {"bytes_up": 0.0, "bytes_down": 0.0, "time_compress": 0.0,
                          "time_comm": 0.0}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def set_lr(self, lr: float) -> None:
        self.param_groups[0]["lr"] = lr

    def training_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Label-flipping workers train on y → K − 1 − y (simulation only)."""
        if self.driver.needs_flipped_labels:
            from hvdcomp.robust.attacks import flip_labels
            return flip_labels(labels, num_classes)
        return labels

    def step(self) -> None:
        if self.weight_decay:
            # L2 regularisation as in the reference (the gradient of λ/2‖θ‖² joins the momentum)
            for p in self.params:
                if p.grad is not None:
                    p.grad.add_(p.detach(), alpha=self.weight_decay)
        started = time.perf_counter()
        self.driver.step(lr=self.param_groups[0]["lr"])
        self._counters["time_comm"] += time.perf_counter() - started
        # Every rank sends its half-step model to the N − 1 others (one allgather); nothing is
        # compressed, so bytes are the dense model's: the method's cost is robustness, not traffic.
        self._counters["bytes_up"] += (self.world_size - 1) * self.gradient_bytes

    def counters(self) -> Dict[str, float]:
        return dict(self._counters)

    def describe(self) -> Dict[str, Any]:
        return self.driver.describe()

    def state_dict(self) -> Dict[str, Any]:
        return {"monna": self.driver.state_dict(), "counters": dict(self._counters)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.driver.load_state_dict(state["monna"])
        self._counters.update(state["counters"])


def check_monna_options(cfg, world_size: int, rank: int) -> None:
    """Raise ValueError for bad MoNNA options before any rank starts (the CLI calls this before
    hvd.init): the driver is built over an idle simulated world of the launch's size, which checks
    everything (n > 2f, attack names, ...) without communicating."""
    import logging

    from hvdcomp.comm import SimCommunicator, SimWorld

    logger = logging.getLogger("hvdcomp.robust.monna")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the real run announces the simulated faults, once
    try:
        MoNNAStep(torch.nn.Linear(1, 1), cfg, SimCommunicator(SimWorld(world_size), rank))
    finally:
        logger.setLevel(level)
