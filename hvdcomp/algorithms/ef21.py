"""EF21 and its variants: EF21-W, EF21-SGDM and EF21-BC (bidirectional), as five-step rounds.

Papers (research notes §2):

* EF21 — Richtárik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and
  Practically Faster Error Feedback", NeurIPS 2021 (arXiv 2106.05203), Algorithm 1;
* EF21-W — Richtárik, Gasanov, Burlachenko, "Error Feedback Reloaded", ICLR 2024 (arXiv 2402.10774);
* EF21-BC — Fatkhullin, Sokolov, Gorbunov, Li, Richtárik, "EF21 with Bells & Whistles"
  (arXiv 2110.03294), bidirectional compression;
* EF21-SGDM — Fatkhullin, Tyurin, Richtárik, "Momentum Provably Improves Error Feedback!",
  NeurIPS 2023.

How the paper's loop maps onto one round of :mod:`hvdcomp.algorithms.base`
--------------------------------------------------------------------------
The paper writes, for t = 0, 1, ...::

    x^{t+1}   = x^t − γ g^t
    c_i^t     = C(∇f_i(x^{t+1}) − g_i^t);   g_i^{t+1} = g_i^t + c_i^t     (client i, sends c_i^t)
    g^{t+1}   = g^t + (1/n) Σ_i c_i^t                                      (server)

hvdcomp's round k starts *after* the optimizer has produced x^k and the backward pass has
produced ∇f_i(x^k); the direction returned by :meth:`worker_update` is what the optimizer applies
next (x^{k+1} = x^k − γ·direction). So one round k performs the paper's client/server lines for
the gradient at x^k and returns g^k, and the optimizer step that follows is the paper's
x^{k+1} = x^k − γ g^k::

    worker_message:  p_i = ∇f_i(x^k) − g_i^{k−1}
    worker_sent:     g_i^k = g_i^{k−1} + C(p_i)
    server_message:  g^k = g^{k−1} + mean_i C(p_i)          (server's chunk)
    worker_update:   returns g^k, dense from the server     → optimizer: x^{k+1} = x^k − γ g^k

Initialisation: the state starts at g_i^{−1} = 0 and g^{−1} = 0, so round 0 sends C(∇f_i(x^0))
and sets g_i^0 = C(∇f_i(x^0)), one of the paper's choices (its code starts from the full
gradient, which would cost one dense round).

EF21's downlink is dense (the paper broadcasts x^{t+1}); :class:`EF21BC` compresses it too.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from .base import Algorithm
from .registry import MethodInfo, Option, Paper
from .stepsize import ef21w_weights

__all__ = ["EF21", "EF21W", "EF21SGDM", "EF21BC", "EF21_PAPER", "EF21W_PAPER", "SMOOTHNESS",
           "fill_smoothness"]

EF21_PAPER = Paper("EF21: A New, Simpler, Theoretically Better, and Practically Faster Error "
                   "Feedback", "Richtárik, Sokolov, Fatkhullin", 2021,
                   "https://arxiv.org/abs/2106.05203", "NeurIPS")
EF21W_PAPER = Paper("Error Feedback Reloaded: From Quadratic to Arithmetic Mean of Smoothness "
                    "Constants", "Richtárik, Gasanov, Burlachenko", 2024,
                    "https://arxiv.org/abs/2402.10774", "ICLR")
#: EF21-W's options; hvdcomp train fills them (equal constants unless given, this rank)
SMOOTHNESS = (Option("smoothness", "list of float", None, "one positive constant L_i per rank",
                     "default in hvdcomp train: equal constants (EF21-W then equals EF21)",
                     filled_by_train=True),
              Option("rank", "int", None, "this worker's index", filled_by_train=True))


def fill_smoothness(options, world_size, rank):
    """What hvdcomp train fills for EF21-W: equal constants unless given, and this rank."""
    options.setdefault("smoothness", [1.0] * world_size)
    options.setdefault("rank", rank)
    return options


class EF21(Algorithm):
    """EF21 (Richtárik et al. 2021, Alg. 1), worker-side compression, dense downlink.

    State: worker i keeps its estimate g_i (``worker_estimate``, whole bucket); the server keeps
    the aggregate g = mean_i g_i for its chunk (``server_aggregate``) and sends it dense.
    Bits per coordinate: up = the compressor's (top-k: k·(32 + index bits)/d), down = 32.
    Stepsize: :func:`hvdcomp.algorithms.stepsize.ef21_stepsize`.
    """
    name = "ef21"
    state_fields = ("worker_estimate", "server_aggregate")
    info = MethodInfo(name="ef21", label="EF21", order=50, paper=EF21_PAPER,
                      summary="workers send compressed changes of their gradient estimates; "
                              "dense downlink")
    compresses_downlink = False

    def __init__(self, up="none", down=None):
        super().__init__(up, down)
        self.worker_estimate: Dict[str, torch.Tensor] = {}   # g_i, whole bucket
        self.server_aggregate: Dict[str, torch.Tensor] = {}  # g, this rank's chunk

    # The target the worker's estimate g_i tracks; EF21-W rescales it, EF21-SGDM smooths it.
    def _target(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def worker_message(self, key, grad):
        estimate = self.worker_estimate.get(key)
        if estimate is None:
            estimate = self.worker_estimate[key] = torch.zeros_like(grad)
        return self._target(key, grad) - estimate          # ∇f_i(x^k) − g_i^{k−1}

    def worker_sent(self, key, message, sent):
        self.worker_estimate[key].add_(sent)               # g_i^k = g_i^{k−1} + c_i

    def server_message(self, key, mean_received):
        aggregate = self.server_aggregate.get(key)
        if aggregate is None:
            aggregate = self.server_aggregate[key] = torch.zeros_like(mean_received)
        aggregate.add_(mean_received)                      # g^k = g^{k−1} + mean_i c_i
        return aggregate.clone()

    def worker_update(self, key, received):
        return received                                    # g^k: the optimizer steps x − γ g^k


class EF21W(EF21):
    """EF21-W (Error Feedback Reloaded, ICLR 2024): weighted EF21 with w_i = L_i / Σ_j L_j.

    The paper's client i compresses y_i = ∇f_i/(n w_i) − g_i, adds u_i = C(y_i) to g_i, and the
    server keeps g = Σ_i w_i g_i. Our exchange only delivers the plain mean of what workers send,
    so worker i sends C(n w_i · y_i) instead and divides it by n w_i before adding it to g_i; then
    mean_i C(n w_i y_i) = Σ_i w_i u_i is exactly the paper's server update. For positively
    homogeneous compressors (top-k, sign with its scale, scaled random-k) C(n w_i y) = n w_i C(y)
    and this is the paper's algorithm bit for bit; for any other compressor it is EF21-W with the
    compressor y ↦ C(n w_i y)/(n w_i), which has the same contraction parameter α.

    ``smoothness``: every client's L_i (same list on all ranks, one entry per rank);
    ``rank``: this worker's index into it. Stepsize: :func:`~.stepsize.ef21w_stepsize`
    (1/(L + L_AM ξ(α)), larger than EF21's when the L_i differ).
    """
    name = "ef21w"
    info = MethodInfo(name="ef21w", label="EF21-W", order=60, paper=EF21W_PAPER,
                      summary="EF21 weighted by the workers' smoothness constants",
                      options=SMOOTHNESS)

    @classmethod
    def train_options(cls, cfg, world_size, rank, steps_per_epoch):
        return fill_smoothness(dict(cfg.algorithm_options), world_size, rank)

    def __init__(self, up="none", down=None, smoothness: Optional[Sequence[float]] = None,
                 rank: Optional[int] = None):
        super().__init__(up, down)
        if smoothness is None:
            raise ValueError("ef21w needs smoothness=[L_1, ..., L_n], one constant per worker "
                             "(estimate them with hvdcomp.algorithms.stepsize.logistic_smoothness "
                             "or your own bound, then allgather)")
        self.smoothness = [float(v) for v in smoothness]
        self.weights = ef21w_weights(self.smoothness)
        if rank is None or not 0 <= int(rank) < len(self.smoothness):
            raise ValueError(f"ef21w needs rank=<this worker's index> in "
                             f"[0, {len(self.smoothness)}), got {rank!r}")
        self.rank = int(rank)
        # n·w_i: the factor between the paper's g_i and what the uniform mean needs.
        self.scale = len(self.weights) * self.weights[self.rank]

    def worker_message(self, key, grad):
        estimate = self.worker_estimate.get(key)
        if estimate is None:
            estimate = self.worker_estimate[key] = torch.zeros_like(grad)
        # n w_i · (∇f_i/(n w_i) − g_i) = ∇f_i − n w_i g_i
        return grad - self.scale * estimate

    def worker_sent(self, key, message, sent):
        self.worker_estimate[key].add_(sent, alpha=1.0 / self.scale)  # g_i += u_i

    def hyperparameters(self) -> Dict[str, Any]:
        return {"smoothness": self.smoothness}


class EF21SGDM(EF21):
    """EF21-SGDM (Fatkhullin, Tyurin, Richtárik 2023): EF21 on a momentum of stochastic gradients.

        v_i^k = (1 − η) v_i^{k−1} + η ∇f_i(x^k; ξ_i^k)       (v_i^0 = ∇f_i(x^0; ξ_i^0))
        g_i^k = g_i^{k−1} + C(v_i^k − g_i^{k−1});   g^k = mean_i g_i^k;   x^{k+1} = x^k − γ g^k

    State: ``worker_momentum`` v_i on top of EF21's. ``eta`` (default 0.1) is the weight of the new
    gradient; the form of the update is research notes §2.3 [UNVERIFIED against the paper's text].
    """
    name = "ef21sgdm"
    state_fields = EF21.state_fields + ("worker_momentum",)
    info = MethodInfo(
        name="ef21sgdm", label="EF21-SGDM", order=70, momentum_inside=True,
        summary="EF21 on a momentum of stochastic gradients",
        paper=Paper("Momentum Provably Improves Error Feedback!",
                    "Fatkhullin, Tyurin, Richtárik", 2023, "https://arxiv.org/abs/2305.15155",
                    "NeurIPS"),
        options=(Option("eta", "float", 0.1, "a number in (0, 1]",
                        "weight of the new gradient in v_i (1 = no momentum)"),))

    @classmethod
    def dense_tensor_momentum(cls, options):
        keep = 1.0 - float(options.get("eta", 0.1))   # v ← (1 − η)v + ηg: SGD momentum 1 − η
        return {"momentum": keep, "dampening": keep, "nesterov": False}

    def __init__(self, up="none", down=None, eta: float = 0.1):
        super().__init__(up, down)
        if not 0.0 < float(eta) <= 1.0:
            raise ValueError(f"ef21sgdm: eta must lie in (0, 1] (1 = no momentum), got {eta}")
        self.eta = float(eta)
        self.worker_momentum: Dict[str, torch.Tensor] = {}

    def _target(self, key, grad):
        momentum = self.worker_momentum.get(key)
        if momentum is None:
            momentum = self.worker_momentum[key] = grad.clone()
        else:
            momentum.mul_(1.0 - self.eta).add_(grad, alpha=self.eta)
        return momentum

    def hyperparameters(self):
        return {"eta": self.eta}


class EF21BC(Algorithm):
    """EF21-BC (EF21 with Bells & Whistles, bidirectional compression): both directions compressed.

    Paper::

        workers: c_i^t = C_w(∇f_i(x^{t+1}) − g̃_i^t);  g̃_i^{t+1} = g̃_i^t + c_i^t
        master:  g̃^{t+1} = (1/n) Σ_i g̃_i^{t+1};  b^{t+1} = C_M(g̃^{t+1} − g^t);
                 g^{t+1} = g^t + b^{t+1}  (broadcast b^{t+1})
        all:     x^{t+1} = x^t − γ g^t

    On the sharded server, rank j plays the master for chunk j: it keeps g̃ and g of that chunk
    (``server_estimate``, ``server_aggregate``); every worker keeps g̃_i and its copy of g for the
    whole bucket (``worker_estimate``, ``worker_aggregate``) and adds the broadcast b to it. Round k
    takes ∇f_i(x^k) and returns g^k, as in :class:`EF21`. Bits: up = C_w's, down = C_M's.
    """
    name = "ef21bc"
    state_fields = ("worker_estimate", "worker_aggregate", "server_estimate", "server_aggregate")
    info = MethodInfo(
        name="ef21bc", label="EF21-BC", order=80,
        summary="EF21 with the downlink compressed too (bidirectional)",
        paper=Paper("EF21 with Bells & Whistles: Practical Algorithmic Extensions of Modern "
                    "Error Feedback", "Fatkhullin, Sokolov, Gorbunov, Li, Richtárik", 2021,
                    "https://arxiv.org/abs/2110.03294", "arXiv"))
    compresses_downlink = True

    def __init__(self, up="none", down=None):
        super().__init__(up, down)
        self.worker_estimate: Dict[str, torch.Tensor] = {}   # g̃_i (whole bucket)
        self.worker_aggregate: Dict[str, torch.Tensor] = {}  # g, as the workers know it
        self.server_estimate: Dict[str, torch.Tensor] = {}   # g̃ (this rank's chunk)
        self.server_aggregate: Dict[str, torch.Tensor] = {}  # g (this rank's chunk)

    def worker_message(self, key, grad):
        estimate = self.worker_estimate.get(key)
        if estimate is None:
            estimate = self.worker_estimate[key] = torch.zeros_like(grad)
        return grad - estimate                              # ∇f_i(x^k) − g̃_i^{k−1}

    def worker_sent(self, key, message, sent):
        self.worker_estimate[key].add_(sent)                # g̃_i^k

    def server_message(self, key, mean_received):
        estimate = self.server_estimate.get(key)
        if estimate is None:
            estimate = self.server_estimate[key] = torch.zeros_like(mean_received)
            self.server_aggregate[key] = torch.zeros_like(mean_received)
        estimate.add_(mean_received)                        # g̃^k = g̃^{k−1} + mean_i c_i
        return estimate - self.server_aggregate[key]        # g̃^k − g^{k−1}, compressed by C_M

    def server_sent(self, key, message, sent):
        self.server_aggregate[key].add_(sent)               # g^k = g^{k−1} + b^k

    def worker_update(self, key, received):
        aggregate = self.worker_aggregate.get(key)
        if aggregate is None:
            aggregate = self.worker_aggregate[key] = torch.zeros_like(received)
        aggregate.add_(received)                            # g^k, identical on every worker
        return aggregate.clone()
