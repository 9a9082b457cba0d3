"""MoNNA: local Polyak momentum, a half-step, and nearest-neighbour averaging of models.

Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust Collaborative Learning with Linear
Gradient Overhead", ICML 2023 (arXiv 2209.10931); reference code ``peerToPeer.py`` (research
notes §4.1). Honest node i, step t::

    g_i      = ∇ℓ(θ_i^t; ξ_i^t)                      (the loop's backward pass: p.grad)
    m_i      = β m_i + (1 − β) g_i                    (m_i = 0 before the first step)
    θ_i^½    = θ_i^t − γ_t m_i                        (half-step)
    θ_j^½    for every j                              (one allgather of the models)
    θ_i^{t+1} = NNA_i = mean of the n − f models closest to θ_i^½

MoNNA exchanges *models*, not gradients, so it does not run through :mod:`hvdcomp.exchange`: this
driver replaces the optimizer's step and uses a communicator's ``allgather`` (the in-process
simulator's or Horovod's, :class:`hvdcomp.comm.HorovodCommunicator`). Traffic per rank and step:
d·32 bits up to each of the n − 1 peers (dense models). State: ``momentum`` m_i (size d).

Simulated faulty workers (``simulate_faults=True`` only): the last f ranks. Every rank allgathers
what every rank computed, then replaces the rows of the faulty ranks by the attack vectors built
from the honest rows (:func:`hvdcomp.robust.attacks.attack_vectors`) — the same result as faulty
ranks that first saw the honest vectors and then sent their attack, with one collective instead of
two, and deterministic on every rank. Under label flipping the training loop gives the faulty ranks
flipped labels (:attr:`MoNNA.needs_flipped_labels`, :func:`~hvdcomp.robust.attacks.flip_labels`);
their row then carries their gradient g_flip and becomes mean(honest) − γ·g_flip. After the
mixing a faulty rank adopts the honest mean, so that its next gradient is taken at a sensible
model. Report only honest ranks' models (:attr:`honest_ranks`); :meth:`describe` labels the run.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional

import torch

from .aggregators import AGGREGATORS, aggregate, check_aggregator_options
from .attacks import ATTACKS, attack_vectors

__all__ = ["MoNNA"]

log = logging.getLogger(__name__)



def _check_hyperparameters(lr: float, beta: float, f: int, aggregator: str, n: int) -> None:
    """MoNNA's own hyperparameters, before anything is built."""
    if not lr > 0:
        raise ValueError(f"MoNNA: lr must be positive, got {lr}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"MoNNA: beta must lie in [0, 1), got {beta}")
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"MoNNA: f must be an int ≥ 0, got {f!r}")
    if f and not n > 2 * f:
        raise ValueError(f"MoNNA tolerates f faulty workers only with an honest majority, "
                         f"n > 2f; got n = {n}, f = {f}")
    if aggregator not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {aggregator!r}; choose one of: "
                         f"{', '.join(AGGREGATORS)}")


def _checked_attack(attack: Optional[str], attack_param: Any, line_search: Optional[bool],
                    simulate_faults: bool, f: int, n: int) -> bool:
    """Check a simulated attack's settings; return whether the attack runs its line search
    (ALIE/FOE default to the MoNNA authors' line search unless a fixed z/ε is given)."""
    if (attack is not None or line_search or attack_param is not None) and not simulate_faults:
        raise ValueError("attacks are simulations of faulty workers for measuring "
                         "robustness; MoNNA refuses to run them unless you pass "
                         "simulate_faults=True")
    if simulate_faults:
        if attack not in ATTACKS:
            raise ValueError(f"simulate_faults=True needs attack= one of: {', '.join(ATTACKS)}")
        if f == 0:
            raise ValueError("simulate_faults=True needs f ≥ 1 faulty workers")
        if attack == "mimic" and attack_param is not None and (
                isinstance(attack_param, bool) or not isinstance(attack_param, int)
                or not 0 <= attack_param < n - f):
            raise ValueError(f"mimic: attack_param is the honest worker to copy, an index in "
                             f"[0, {n - f}), got {attack_param!r}")
    if line_search is None:
        return attack in ("alie", "foe") and attack_param is None
    if line_search and attack_param is not None:
        raise ValueError("give either attack_param (a fixed z/ε) or line_search, not both")
    return bool(line_search)

class MoNNA:
    """One MoNNA step per call of :meth:`step`, after the backward pass (see module docstring).

    Parameters: ``params`` (the model's parameters, same order on every rank), ``comm`` (anything
    with ``rank``, ``size`` and ``allgather(tensor, name)``), ``lr`` γ, ``beta`` β = 0.99 (the
    reference's momentum = dampening; 0 switches momentum off), ``f`` faulty workers tolerated,
    ``aggregator`` one of ``nna`` (default), ``trimmed_mean``, ``median``, ``mean``, or the
    baselines ``krum``, ``rfa`` (geometric median), ``cclip`` (self-centred clipping), with
    ``aggregator_options`` (rfa: ``nu``, ``iterations``; cclip: ``radius``, ``iterations``;
    :mod:`.baselines`); and for
    simulations only: ``attack`` (``alie``, ``foe``, ``sign_flip``, ``label_flip``, ``mimic``),
    ``attack_param`` (a fixed z, or Xie et al.'s ε: FOE sends −ε·mean), ``line_search`` (choose
    z/ε each step to maximise the damage to ``aggregator``, as the MoNNA authors' code does; the
    default for ALIE and FOE when no ``attack_param`` is given) and ``simulate_faults=True`` to
    allow any of them.
    """

    def __init__(self, params: Iterable[torch.Tensor], comm: Any, lr: float, beta: float = 0.99,
                 f: int = 0, aggregator: str = "nna", attack: Optional[str] = None,
                 attack_param: Optional[float] = None, line_search: Optional[bool] = None,
                 simulate_faults: bool = False,
                 aggregator_options: Optional[Dict[str, Any]] = None):
        self.params: List[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("MoNNA got no parameters: pass model.parameters()")
        for attr in ("rank", "size", "allgather"):
            if not hasattr(comm, attr):
                raise ValueError(f"MoNNA needs a communicator with rank, size and allgather "
                                 f"(hvdcomp.comm); {type(comm).__name__} has no {attr!r}")
        self.comm = comm
        self.n = int(comm.size)
        _check_hyperparameters(lr, beta, f, aggregator, self.n)
        line_search = _checked_attack(attack, attack_param, line_search, simulate_faults, f,
                                      self.n)
        self.aggregator_options = dict(aggregator_options or {})
        self._check_aggregator(aggregator, f)
        self.lr = float(lr)
        self.beta = float(beta)
        self.f = f
        self.aggregator = aggregator
        self.attack = attack if simulate_faults else None
        self.attack_param = attack_param
        self.line_search = line_search
        self.simulate_faults = bool(simulate_faults)
        self.steps = 0
        self.momentum = torch.zeros(sum(p.numel() for p in self.params),
                                    dtype=self.params[0].dtype, device=self.params[0].device)
        if self.simulate_faults:
            log.warning("SIMULATED FAULTY WORKERS: ranks %s of %d run attack %r (f = %d); report "
                        "honest ranks %s only", list(self.faulty_ranks), self.n, self.attack,
                        self.f, list(self.honest_ranks))

    def _check_aggregator(self, aggregator: str, f: int) -> None:
        """Bad aggregator options fail here, before any step: one dry call on n zero vectors
        checks the option names, their values and the rule's bound on n and f (krum: n > 2f + 2)."""
        check_aggregator_options(aggregator, self.aggregator_options)
        aggregate(aggregator, torch.zeros(self.n, 1), f, pivot=torch.zeros(1),
                  **self.aggregator_options)

    # --- who is who ----------------------------------------------------------------------------
    @property
    def faulty_ranks(self) -> tuple:
        """The simulated faulty ranks: the last f ranks; empty unless simulating faults."""
        return tuple(range(self.n - self.f, self.n)) if self.simulate_faults else ()

    @property
    def honest_ranks(self) -> tuple:
        faulty = set(self.faulty_ranks)
        return tuple(r for r in range(self.n) if r not in faulty)

    @property
    def is_faulty(self) -> bool:
        return self.comm.rank in self.faulty_ranks

    @property
    def needs_flipped_labels(self) -> bool:
        """True on a faulty rank under label flipping: the loop must train it on flip_labels(y)."""
        return self.is_faulty and self.attack == "label_flip"

    def describe(self) -> Dict[str, Any]:
        """For run configs and results: what this run simulates, stated plainly."""
        described = {"algorithm": "monna", "aggregator": self.aggregator, "beta": self.beta,
                "f": self.f, "simulated_faults": self.simulate_faults,
                "faulty_ranks": list(self.faulty_ranks), "attack": self.attack,
                "attack_param": self.attack_param, "line_search": self.line_search}
        if self.aggregator_options:
            described["aggregator_options"] = dict(self.aggregator_options)
        return described

    # --- the step ------------------------------------------------------------------------------
    def _flat(self, tensors) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def _gradient(self) -> torch.Tensor:
        return torch.cat([(p.grad.detach() if p.grad is not None else torch.zeros_like(p))
                          .reshape(-1) for p in self.params])

    @torch.no_grad()
    def step(self, lr: Optional[float] = None) -> Dict[str, Any]:
        """Momentum, half-step, allgather, robust mixing; writes θ^{t+1} into the parameters.

        ``lr`` overrides γ for this and later steps (a schedule). Returns
        ``{"step", "faulty", "distance_to_honest_mean"}`` (the distance of this rank's new model
        to the mean of the honest half-steps: a direct measure of how far the faults pulled it)."""
        if lr is not None:
            self.lr = float(lr)
        theta = self._flat(self.params)
        gradient = self._gradient()
        if self.needs_flipped_labels:
            row = gradient                                         # g_flip, used by every rank
        else:
            self.momentum.mul_(self.beta).add_(gradient, alpha=1.0 - self.beta)
            row = theta - self.lr * self.momentum                  # θ_i^{t+1/2}
        gathered = self.comm.allgather(row.unsqueeze(0), f"hvdcomp.monna.{self.steps}")
        gathered = gathered.reshape(self.n, -1).to(theta.dtype)
        honest_idx = list(self.honest_ranks)
        honest = gathered[honest_idx]
        received = gathered.clone()
        if self.simulate_faults:
            faulty_idx = list(self.faulty_ranks)
            received[faulty_idx] = attack_vectors(
                self.attack, honest, self.f, param=self.attack_param, search=self.line_search,
                aggregator=self.aggregator,
                flipped_gradient=gathered[faulty_idx] if self.attack == "label_flip" else None,
                lr=self.lr)
        if self.is_faulty:
            new_theta = honest.mean(0)
        else:
            new_theta = aggregate(self.aggregator, received, self.f, pivot=row,
                                  **self.aggregator_options)
        offset = 0
        for p in self.params:
            p.copy_(new_theta[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.steps += 1
        return {"step": self.steps, "faulty": self.is_faulty,
                "distance_to_honest_mean": float(torch.linalg.vector_norm(
                    new_theta - honest.mean(0)))}

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"steps": self.steps, "momentum": self.momentum.clone(), "config": self.describe()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("config") != self.describe():
            raise ValueError(f"checkpoint was written by {state.get('config')}, this run is "
                             f"{self.describe()}: resume with the same MoNNA settings")
        self.steps = int(state["steps"])
        self.momentum.copy_(state["momentum"])
