"""MoNNA as a training method: it exchanges models, not gradients, so it owns its exchange.

The method itself is :class:`hvdcomp.robust.MoNNA` (momentum, half-step, allgather of models,
robust mixing; Farhadkhani et al., ICML 2023); its step in the training loop is
:class:`hvdcomp.train.robust_step.MoNNAStep`. This module only declares it to the registry
(:mod:`.registry`): its paper, defaults and options, and the hooks ``hvdcomp train`` calls, so
the training loop and the CLI treat it like any other method.
"""
from __future__ import annotations

from .registry import MethodInfo, Option, Paper, TrainingMethod

__all__ = ["MoNNAMethod"]


class MoNNAMethod(TrainingMethod):
    """MoNNA for ``hvdcomp train --algorithm monna`` (see the module docstring)."""

    info = MethodInfo(
        name="monna", label="MoNNA", order=100, up="none", down="none",
        compressors_refused="exchanges whole models, uncompressed", momentum_inside=True,
        summary="Polyak momentum, a half-step, nearest-neighbour averaging of the models "
                "(robust to faulty workers)",
        paper=Paper("Robust Collaborative Learning with Linear Gradient Overhead",
                    "Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan", 2023,
                    "https://arxiv.org/abs/2209.10931", "ICML"),
        options=(
            Option("beta", "float", 0.99, "a number in [0, 1)", "Polyak momentum"),
            Option("f", "int", 0, "an integer >= 0 with n > 2f", "faulty workers tolerated"),
            Option("aggregator", "str", "nna",
                   "nna, trimmed_mean, median, mean, krum, rfa, cclip"),
            Option("nu", "float", None, "a positive number", "rfa's smoothing"),
            Option("iterations", "int", None, "an integer >= 1", "rfa's and cclip's"),
            Option("radius", "float", None, "a positive number", "cclip's clipping radius"),
            Option("attack", "str", None, "alie, foe, sign_flip, label_flip, mimic",
                   "simulates the last f ranks as faulty"),
            Option("attack_param", "float", None, "a number (mimic: an honest rank)"),
            Option("line_search", "bool", None, "true or false")))

    @classmethod
    def check_train(cls, cfg, world_size, rank):
        from hvdcomp.train.robust_step import check_monna_options
        check_monna_options(cfg, world_size, rank)

    @classmethod
    def train_step(cls, model, cfg, comm):
        from hvdcomp.train.robust_step import MoNNAStep
        return MoNNAStep(model, cfg, comm)
