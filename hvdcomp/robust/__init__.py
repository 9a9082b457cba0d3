"""Robust collaborative learning: models (not gradients) exchanged and mixed by robust rules.

    aggregators  nna, trimmed_mean, median, mean          hvdcomp.robust.aggregators
    baselines    krum, rfa (geometric median), cclip       hvdcomp.robust.baselines
    attacks      ALIE, FOE, sign flipping, label flipping, hvdcomp.robust.attacks  (simulation only)
                 mimic
    monna        MoNNA's step: Polyak momentum, half-step,  hvdcomp.robust.monna
                 allgather of models, robust mixing

Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust Collaborative Learning with Linear
Gradient Overhead", ICML 2023 (arXiv 2209.10931); research notes §4.
"""
from .aggregators import AGGREGATORS, aggregate, mean, median, nna, trimmed_mean
from .baselines import centered_clip, geometric_median, krum
from .attacks import (ATTACKS, alie, alie_default_z, attack_vectors, flip_labels, foe, label_flip,
                      mimic, sign_flip)
from .monna import MoNNA

__all__ = ["AGGREGATORS", "aggregate", "mean", "median", "nna", "trimmed_mean",
           "ATTACKS", "alie", "alie_default_z", "attack_vectors", "flip_labels", "foe",
           "label_flip", "sign_flip", "MoNNA", "krum", "geometric_median", "centered_clip",
           "mimic"]
