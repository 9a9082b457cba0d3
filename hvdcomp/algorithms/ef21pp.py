"""EF21-PP and EF21-W-PP: EF21 (and its weighted form) with partial participation.

* EF21-PP — Fatkhullin, Sokolov, Gorbunov, Li, Richtárik, "EF21 with Bells & Whistles: Practical
  Algorithmic Extensions of Modern Error Feedback" (arXiv 2110.03294), partial participation;
* EF21-W-PP — Richtárik, Gasanov, Burlachenko, "Error Feedback Reloaded: From Quadratic to
  Arithmetic Mean of Smoothness Constants", ICLR 2024 (arXiv 2402.10774).

Each round a random set S_t of workers takes part, worker i with probability p, independently
(Prob(i ∈ S_t) = p_i = p; research notes §2.3)::

    x^{t+1}   = x^t − γ g^t
    i ∈ S_t:  c_i^t = C(∇f_i(x^{t+1}) − g_i^t);   g_i^{t+1} = g_i^t + c_i^t
    i ∉ S_t:  c_i^t = 0;                          g_i^{t+1} = g_i^t
    g^{t+1}   = g^t + (1/n) Σ_{i∈S_t} c_i^t

EF21-W-PP: the same sampling on EF21-W (c_i = C(∇f_i/(n w_i) − g_i), g = Σ_i w_i g_i).

Round k of hvdcomp maps onto this as EF21's does (:mod:`.ef21`). Round 0 is the initialisation
g_i^0 = C(∇f_i(x^0)) of every worker (everyone takes part); from round 1 on S_t is drawn.

Shared draw: worker i is in S_t iff u < p for u uniform from a generator seeded with
crc32("<seed>:<t>:<i>"), so every rank computes every rank's membership without communicating,
and the draw of one worker does not depend on the world size.

What travels: the collectives need every rank, so a worker outside S_t still sends its fixed-size
payload, of C(0) = 0 (the server's mean is then exactly (1/n) Σ_{i∈S_t} c_i). hvdcomp's byte
counters count these payloads; the papers count only participants' messages, p times fewer on
average. It also still computes its gradient, which the papers' non-participants skip.
"""
from __future__ import annotations

import zlib

import torch

from .ef21 import EF21, EF21W, EF21W_PAPER, SMOOTHNESS
from .registry import MethodInfo, Option, Paper

__all__ = ["EF21PP", "EF21WPP", "participates"]


def participates(seed: int, round_: int, worker: int, probability: float) -> bool:
    """Whether ``worker`` is in S_t for round ``round_`` (round 0: everyone, the initialisation)."""
    if round_ == 0 or probability >= 1.0:
        return True
    text = f"{int(seed)}:{int(round_)}:{int(worker)}"
    generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return float(torch.rand((), generator=generator, dtype=torch.float64)) < probability


def _check(name: str, participation, rank) -> None:
    if isinstance(participation, bool) or not isinstance(participation, (int, float)) \
            or not 0.0 < float(participation) <= 1.0:
        raise ValueError(f"{name}: participation must be a probability in (0, 1] (each worker "
                         f"takes part in a round with it), not {participation!r}")
    if rank is None or isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"{name} needs rank=<this worker's index> (an int >= 0) to know whether "
                         f"it takes part in a round, got {rank!r}")


PARTICIPATION = (Option("participation", "float", 0.5, "a probability in (0, 1]",
                        "each worker takes part in a round with it"),
                 Option("rank", "int", None, "this worker's index", filled_by_train=True),
                 Option("seed", "int", 0, "an integer", "the shared seed of the draws "
                        "(hvdcomp train: --seed)", filled_by_train=True))


class _PartialParticipation:
    """What EF21-PP adds to EF21 and EF21-W-PP to EF21-W: zero messages outside S_t."""

    @classmethod
    def train_options(cls, cfg, world_size, rank, steps_per_epoch):
        # the draw of the participating workers: every rank knows its rank and the seed
        options = super().train_options(cfg, world_size, rank, steps_per_epoch)
        options.setdefault("rank", rank)
        options.setdefault("seed", cfg.seed)
        return options

    def _init_participation(self, participation, rank, seed):
        _check(self.name, participation, rank)
        self.participation = float(participation)
        self.rank = int(rank)
        self.seed = int(seed)

    def active(self) -> bool:
        """This worker is in S_t this round."""
        return participates(self.seed, self.step, self.rank, self.participation)

    def worker_message(self, key, grad):
        message = super().worker_message(key, grad)
        return message if self.active() else torch.zeros_like(message)   # c_i = C(0) = 0

    def worker_sent(self, key, message, sent):
        if self.active():                                                # g_i unchanged outside
            super().worker_sent(key, message, sent)

    def hyperparameters(self):
        return {**super().hyperparameters(), "participation": self.participation,
                "seed": self.seed}


class EF21PP(_PartialParticipation, EF21):
    """EF21-PP: EF21 where each worker takes part in a round with probability ``participation``.

    ``rank``: this worker's index (the training loop fills it); ``seed``: the shared seed of the
    draws. State: EF21's (g_i, g)."""
    name = "ef21pp"
    info = MethodInfo(
        name="ef21pp", label="EF21-PP", order=130, options=PARTICIPATION,
        summary="EF21 with partial participation",
        paper=Paper("EF21 with Bells & Whistles: Practical Algorithmic Extensions of Modern "
                    "Error Feedback", "Fatkhullin, Sokolov, Gorbunov, Li, Richtárik", 2021,
                    "https://arxiv.org/abs/2110.03294", "arXiv"))

    def __init__(self, up="none", down=None, participation: float = 0.5, rank=None,
                 seed: int = 0):
        super().__init__(up, down)
        self._init_participation(participation, rank, seed)


class EF21WPP(_PartialParticipation, EF21W):
    """EF21-W-PP: EF21-W (weights w_i = L_i/Σ_j L_j from ``smoothness``) with partial
    participation; see :class:`EF21PP`."""
    name = "ef21wpp"
    info = MethodInfo(name="ef21wpp", label="EF21-W-PP", order=140, paper=EF21W_PAPER,
                      summary="EF21-W with partial participation",
                      options=SMOOTHNESS + PARTICIPATION[:1] + PARTICIPATION[2:])

    def __init__(self, up="none", down=None, smoothness=None, rank=None,
                 participation: float = 0.5, seed: int = 0):
        super().__init__(up, down, smoothness=smoothness, rank=rank)
        self._init_participation(participation, rank, seed)
