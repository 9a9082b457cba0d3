"""Deep Gradient Compression (Lin, Han, Mao, Wang, Dally, ICLR 2018, arXiv 1712.01887).

Worker k of N, every round (research notes §3.1, matching the reference code's ``DGCSGDMemory``):

    g      ← g · min(1, (thr·N^{−1/2}) / ‖g‖)      local gradient clipping (optional, ``clip_norm``)
    u      ← m·u + g                               momentum correction: accumulate velocity
    v      ← v + u                                 (Nesterov: u ← m(u + g);  v ← v + u + g)
    send     top-k(v) with the ``dgc`` sampled-threshold sparsifier (values + indices)
    v      ← v ⊙ ¬mask;  u ← u ⊙ ¬mask             momentum factor masking (mask = sent coordinates)
    G      = (1/N) Σ_k sparse(v_k)                 the allgathered payloads, decoded and averaged
    w      ← w − η (G + weight-decay term)         :class:`DGCSGD`: momentum only on λw

State per worker (whole bucket): ``momentum`` u and ``velocity`` v. Server: nothing with the
allgather pattern (``Exchange(..., pattern="allgather")``, what DGC does); with the two-phase
pattern and a lossy ``down`` compressor the server re-sparsifies its chunk of G and, by default,
keeps what that dropped in ``server_error`` (added to the next round's chunk, as DoubleSqueeze's
server does).

Sparsity warm-up (paper §"Warm-up training"): densities 25 %, 6.25 %, 1.5625 %, 0.390625 %,
then the final 0.1 % — the paper's 75 % → 93.75 % → 98.4375 % → 99.6 % → 99.9 % sparsity, one
value per epoch over 4 warm-up epochs (:func:`dgc_density`). The reference code's default
(coeff^(epoch+1) with coeff = final^(1/(W+1))) is a different schedule and is not used. The
round learns the epoch from ``steps_per_epoch`` (counted from its own rounds) or from
:meth:`DGC.set_epoch`; without either it runs at the final density from the first round and logs
a warning once.

Bits per coordinate, up: density × (32 value bits + index bits) (the ``dgc`` compressor uses
8/16/32-bit indices by bucket size), i.e. ≈ 0.048 at 99.9 % with 16-bit indices; down: nothing
extra with the allgather pattern (every rank receives N−1 such payloads).

Per layer (``per_layer=True``, the default): the paper selects the top-k of each layer with its
own threshold, and compresses only tensors with more than one dimension (biases and BatchNorm
parameters travel dense).  The optimizer tells the algorithm each bucket's layers
(:meth:`DGC.set_layout`, called by :class:`hvdcomp.DistributedOptimizer`), and the bucket's uplink
is then a :class:`~hvdcomp.compressors.layerwise.PerLayer` compressor: the sparsifier per layer of
dim > 1, the others dense.  A dense layer carries the plain gradient (no velocity: nothing is
left behind to correct), so the round returns its plain average, and momentum belongs to the
wrapped optimizer for those tensors — as in the reference, where ``compensate(...,
accumulate=False)`` applies ordinary momentum after averaging (``hvdcomp train`` gives them an SGD
parameter group with momentum m; so it does for the tensors under ``small_tensor_bytes``, which
the optimizer exchanges dense outside this algorithm).  A bucket without a layout is one layer.
Per-layer selection needs the whole bucket, i.e. ``pattern="allgather"`` (what DGC does).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..compressors import Compressor
from ..compressors.layerwise import PerLayer
from .base import Algorithm
from .registry import MethodInfo, Option, Paper
from .memsgd import store_difference

__all__ = ["DGC", "DGCSGD", "dgc_density", "clip_local_gradient"]

log = logging.getLogger(__name__)

#: the paper's per-epoch reduction of the density during warm-up (75 % sparsity first, then ×1/4)
WARMUP_FACTOR = 0.25


def dgc_density(epoch: int, warmup_epochs: int = 4, final: float = 0.001) -> float:
    """Fraction of coordinates DGC sends in ``epoch`` (0-based) under the paper's warm-up.

    During the first ``warmup_epochs`` epochs the density is 0.25^(epoch+1) (never below
    ``final``): 0.25, 0.0625, 0.015625, 0.00390625 — sparsity 75 %, 93.75 %, 98.4375 %, 99.6 %
    as the paper prints them — and ``final`` (99.9 % sparsity by default) afterwards."""
    if not 0.0 < float(final) <= 1.0:
        raise ValueError(f"final density must lie in (0, 1], got {final}")
    if int(warmup_epochs) < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if int(epoch) < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epoch < warmup_epochs:
        return max(WARMUP_FACTOR ** (int(epoch) + 1), float(final))
    return float(final)


def clip_local_gradient(grad: torch.Tensor, clip_norm: float, world_size: int) -> torch.Tensor:
    """DGC's local gradient clipping: rescale ``grad`` so that ‖grad‖₂ ≤ clip_norm·N^{−1/2}.

    The paper's argument: with N workers each holding 1/N of the batch, a worker's gradient norm
    is ≈ N^{−1/2} of the summed gradient's, so the global threshold is scaled by N^{−1/2}."""
    limit = float(clip_norm) / math.sqrt(world_size)
    # On the device, without reading the norm on the host (a GPU would wait for it every round):
    # the scale is limit/‖g‖ in float64 (what Python computed from the norm read as a float),
    # or 1 when the norm is within the limit or not a number; multiplying by 1 changes nothing.
    norm = torch.linalg.vector_norm(grad).to(torch.float64)
    scale = torch.where(norm > limit, torch.div(torch.full_like(norm, limit), norm),
                        torch.ones_like(norm))
    return _times_scalar(grad, scale)


def _times_scalar(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x · scale`` for a float64 0-dim ``scale`` on x's device, rounded as ``x * float(scale)``
    rounds: PyTorch multiplies by a Python number in x's "opmath" type (float32 for float16,
    bfloat16 and float32; float64 for float64), so the scale is rounded to that type once and
    the product once more to x's dtype."""
    opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.dtype == opmath:
        return x * scale.to(opmath)
    return (x.to(opmath) * scale.to(opmath)).to(x.dtype)


class DGC(Algorithm):
    """DGC as a five-step round; see the module docstring for the update equations.

    Parameters: ``up`` (default ``"dgc:ratio=0.001"``, the final density), ``down`` (``"none"``:
    the server's average travels dense, as the allgather pattern does), ``momentum`` m = 0.9,
    ``nesterov`` = False, ``clip_norm`` = None (the global threshold thr; needs ``world_size``),
    ``momentum_masking`` = True, ``warmup_epochs`` = 4, ``steps_per_epoch`` = None,
    ``server_error_feedback`` = True (only matters for a lossy ``down`` in the two-phase pattern),
    ``per_layer`` = True (a threshold per layer of dim > 1, other layers dense; needs the layouts
    from :meth:`set_layout`).
    """
    name = "dgc"
    state_fields = ("momentum", "velocity", "server_error")
    info = MethodInfo(
        name="dgc", label="DGC", order=90, up="dgc:ratio=0.001", down="none",
        pattern="allgather", momentum_inside=True,
        summary="momentum correction, local clipping, momentum factor masking, sparsity warm-up",
        paper=Paper("Deep Gradient Compression: Reducing the Communication Bandwidth for "
                    "Distributed Training", "Lin, Han, Mao, Wang, Dally", 2018,
                    "https://arxiv.org/abs/1712.01887", "ICLR"),
        options=(
            Option("momentum", "float", 0.9, "a number in [0, 1)", "m of the correction"),
            Option("nesterov", "bool", False, "true or false"),
            Option("clip_norm", "float", None, "a positive number (needs world_size)",
                   "local gradient clipping threshold"),
            Option("world_size", "int", None, "an integer >= 1"),
            Option("momentum_masking", "bool", True, "true or false"),
            Option("warmup_epochs", "int", 4, "an integer >= 0"),
            Option("steps_per_epoch", "int", None, "an integer >= 1",
                   "for the warm-up's epochs", filled_by_train=True),
            Option("server_error_feedback", "bool", True, "true or false"),
            Option("per_layer", "bool", True, "true or false",
                   "a threshold per layer of dim > 1 (needs --pattern allgather)")))

    @classmethod
    def train_options(cls, cfg, world_size, rank, steps_per_epoch):
        options = dict(cfg.algorithm_options)
        if steps_per_epoch is not None:
            options.setdefault("steps_per_epoch", steps_per_epoch)
        if options.get("per_layer", True) and cfg.pattern != "allgather":
            raise ValueError(f"per-layer top-k (the paper's, the default) needs the whole "
                             f"bucket, i.e. --pattern allgather, not {cfg.pattern!r}; pass "
                             "--algorithm-option per_layer=false to select per bucket or chunk")
        return options

    @classmethod
    def sends_dense(cls, parameter, options):
        return bool(options.get("per_layer", True)) and parameter.dim() <= 1

    @classmethod
    def dense_tensor_momentum(cls, options):
        # the reference applies ordinary momentum m to them after averaging
        momentum = float(options.get("momentum", 0.9))
        nesterov = bool(options.get("nesterov", False)) and momentum > 0
        return {"momentum": momentum, "dampening": 0.0, "nesterov": nesterov}

    def __init__(self, up: "Compressor | str" = "dgc:ratio=0.001",
                 down: "Compressor | str | None" = "none", momentum: float = 0.9,
                 nesterov: bool = False, clip_norm: Optional[float] = None,
                 world_size: Optional[int] = None, momentum_masking: bool = True,
                 warmup_epochs: int = 4, steps_per_epoch: Optional[int] = None,
                 server_error_feedback: bool = True, per_layer: bool = True):
        super().__init__(up, "none" if down is None else down)
        if not isinstance(getattr(self.up, "ratio", None), float):
            # Masking zeroes u and v wherever something was sent: with a dense compressor that is
            # every coordinate each round, and the momentum correction silently disappears.
            raise ValueError(f"dgc sends a sparse top-k of its velocity: give a sparsifying uplink "
                             f"compressor such as up='dgc:ratio=0.001' (or topk/randomk), not "
                             f"{self.up.spec()!r}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"dgc: momentum must lie in [0, 1), got {momentum}")
        if clip_norm is not None:
            if not float(clip_norm) > 0:
                raise ValueError(f"dgc: clip_norm must be positive, got {clip_norm}")
            if world_size is None or int(world_size) < 1:
                raise ValueError("dgc: local gradient clipping scales the threshold by "
                                 "world_size^(-1/2); pass world_size=<number of workers>")
        if steps_per_epoch is not None and int(steps_per_epoch) < 1:
            raise ValueError(f"dgc: steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.momentum_factor = float(momentum)
        self.nesterov = bool(nesterov)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.world_size = None if world_size is None else int(world_size)
        self.momentum_masking = bool(momentum_masking)
        self.warmup_epochs = int(warmup_epochs)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.server_error_feedback = bool(server_error_feedback)
        self.per_layer = bool(per_layer)
        # bucket key -> ((numel, ndim) of each tensor), from the optimizer; and the PerLayer
        # uplink built for it from the current (warm-up) compressor. Not state: the model's shape.
        self._layouts: Dict[str, Tuple[Tuple[int, int], ...]] = {}
        self._uplinks: Dict[str, Tuple[Compressor, PerLayer]] = {}
        # The compressor the user asked for carries the final density; warm-up swaps in copies
        # with a larger ratio.
        self.final_up = self.up
        self.epoch: Optional[int] = None
        self._warned_no_epoch = False
        self.momentum: Dict[str, torch.Tensor] = {}      # u
        self.velocity: Dict[str, torch.Tensor] = {}      # v
        self.server_error: Dict[str, torch.Tensor] = {}  # re-sparsification error, server chunk
        if self.steps_per_epoch is not None:
            self.set_epoch(0)

    # --- sparsity warm-up ----------------------------------------------------------------------
    @property
    def has_warmup(self) -> bool:
        return self.warmup_epochs > 0

    def density(self, epoch: int) -> float:
        """The density this round's compressor uses in ``epoch``."""
        return dgc_density(epoch, self.warmup_epochs, self.final_up.ratio)

    def set_epoch(self, epoch: int) -> None:
        """Select the warm-up density of ``epoch`` (0-based); call it at every epoch start on
        every rank (or pass ``steps_per_epoch`` and let the rounds count)."""
        self.epoch = int(epoch)
        if not self.has_warmup:
            return
        density = self.density(self.epoch)
        if density != self.up.ratio:
            params = {k: v for k, v in self.final_up.config().items() if k != "name"}
            params["ratio"] = density
            self.up = type(self.final_up)(**params)

    def end_round(self) -> None:
        super().end_round()
        if self.steps_per_epoch is not None:
            epoch = self.step // self.steps_per_epoch
            if epoch != self.epoch:
                self.set_epoch(epoch)

    # --- per-layer selection -------------------------------------------------------------------
    def set_layout(self, key: str, tensors: Sequence[Tuple[int, int]]) -> None:
        """Declare bucket ``key``'s tensors, in bucket order, as ``(numel, ndim)`` pairs (the
        optimizer calls this).  With ``per_layer``, tensors with ndim > 1 get their own top-k
        and the others travel dense."""
        self._layouts[str(key)] = tuple((int(n), int(dim)) for n, dim in tensors)
        self._uplinks.pop(str(key), None)

    def _dense_ranges(self, key: str) -> List[Tuple[int, int]]:
        """(start, stop) of the layers of ``key`` that travel dense (per layer, ndim ≤ 1)."""
        if not self.per_layer or key not in self._layouts:
            return []
        ranges, start = [], 0
        for numel, dim in self._layouts[key]:
            if dim <= 1 and numel:
                ranges.append((start, start + numel))
            start += numel
        return ranges

    def uplink_for(self, key: str) -> Compressor:
        """The uplink compressor of bucket ``key`` (read by the exchange): per layer when a
        layout is known, else this epoch's whole-bucket sparsifier."""
        if not self.per_layer or key not in self._layouts:
            return self.up
        cached = self._uplinks.get(key)
        if cached is None or cached[0] is not self.up:
            segments = [(numel, dim > 1) for numel, dim in self._layouts[key]]
            cached = self._uplinks[key] = (self.up, PerLayer(self.up, segments))
        return cached[1]

    # --- the five steps ------------------------------------------------------------------------
    def worker_message(self, key, grad):
        if self.has_warmup and self.epoch is None and not self._warned_no_epoch:
            self._warned_no_epoch = True
            log.warning("dgc: no epoch given (steps_per_epoch or set_epoch), so the sparsity "
                        "warm-up is off and every round sends density %g", self.final_up.ratio)
        if self.clip_norm is not None:
            grad = clip_local_gradient(grad, self.clip_norm, self.world_size)
        u = self.momentum.get(key)
        if u is None:
            u = self.momentum[key] = torch.zeros_like(grad)
            self.velocity[key] = torch.zeros_like(grad)
        v = self.velocity[key]
        m = self.momentum_factor
        if self.nesterov:
            u.add_(grad).mul_(m)                           # u ← m(u + g)
            v.add_(u).add_(grad)                           # v ← v + u + g
        else:
            u.mul_(m).add_(grad)                           # u ← m u + g
            v.add_(u)                                      # v ← v + u
        message = v.clone()
        for start, stop in self._dense_ranges(key):
            # a dense layer sends its plain gradient; its momentum is the optimizer's
            message[start:stop] = grad[start:stop]
            u[start:stop] = 0.0
            v[start:stop] = 0.0
        return message

    def worker_sent(self, key, message, sent):
        sent_mask = sent != 0                              # the coordinates that travelled
        self.velocity[key].masked_fill_(sent_mask, 0.0)    # v ← v ⊙ ¬mask
        if self.momentum_masking:
            self.momentum[key].masked_fill_(sent_mask, 0.0)  # u ← u ⊙ ¬mask

    def server_message(self, key, mean_received):
        if not self.server_error_feedback:
            return mean_received
        error = self.server_error.get(key)
        return mean_received if error is None else mean_received + error

    def server_sent(self, key, message, sent):
        # Decided without comparing message and sent (a comparison read on the host would make
        # a GPU wait every round): nothing is lost when the server sends its message itself (the
        # allgather pattern's replicated server) or through the lossless ``none`` compressor.
        if not self.server_error_feedback or sent is message or self.down.name == "none":
            return
        store_difference(self.server_error, key, message, sent)   # what the downlink dropped

    def worker_update(self, key, received):
        return received

    # --- bookkeeping ---------------------------------------------------------------------------
    def hyperparameters(self) -> Dict[str, Any]:
        return {"momentum": self.momentum_factor, "nesterov": self.nesterov,
                "clip_norm": self.clip_norm, "world_size": self.world_size,
                "momentum_masking": self.momentum_masking, "warmup_epochs": self.warmup_epochs,
                "steps_per_epoch": self.steps_per_epoch,
                "server_error_feedback": self.server_error_feedback, "per_layer": self.per_layer}

    def config(self) -> Dict[str, Any]:
        # The final compressor, not this epoch's: the configuration stays the same through warm-up.
        return {**super().config(), "up": self.final_up.spec()}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["epoch"] = self.epoch
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        epoch = state.pop("epoch", None)
        super().load_state_dict(state)
        if epoch is not None:
            self.set_epoch(epoch)


class DGCSGD(torch.optim.Optimizer):
    """SGD for DGC (reference ``dgc/optim/sgd.py``): the exchanged update already carries the
    momentum (momentum correction), so momentum acts only on the weight-decay term::

        b ← m·b + λw            (b = λw at the first step)
        d = G + b               (Nesterov: d = G + λw + m·b)
        w ← w − lr·d

    With ``weight_decay = 0`` it is plain SGD without momentum. Alternatively use
    ``torch.optim.SGD(momentum=0, weight_decay=λ)``, which differs only in not smoothing λw.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False):
        if lr < 0:
            raise ValueError(f"DGCSGD: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"DGCSGD: momentum must lie in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"DGCSGD: weight_decay must be >= 0, got {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("DGCSGD: nesterov needs a positive momentum")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m = group["lr"], group["momentum"]
            wd, nesterov = group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction = p.grad
                if wd != 0:
                    decay = p.mul(wd)
                    if m != 0:
                        state = self.state[p]
                        buf = state.get("momentum_buffer")
                        if buf is None:
                            buf = state["momentum_buffer"] = decay.clone()
                        else:
                            buf.mul_(m).add_(decay)
                        decay = decay.add(buf, alpha=m) if nesterov else buf
                    direction = direction.add(decay)
                p.add_(direction, alpha=-lr)
        return loss
