"""The algorithm interface: error feedback as five small steps around one exchange.

Every bidirectional method in hvdcomp is written as the same round, which the exchange
(:mod:`hvdcomp.exchange`) drives for each bucket ``key`` (a flat gradient buffer):

    worker i                              server (rank j owns chunk j of every bucket)
    ---------                             ------------------------------------------
    p_i  = worker_message(key, g_i)
    C(p_i) travels up (compressor ``up``)
    worker_sent(key, p_i, C(p_i))
                                          m   = mean_i C(p_i)[chunk j]
                                          v   = server_message(key, m)
                                          C(v) travels down (compressor ``down``)
                                          server_sent(key, v, C(v))
    u_i  = worker_update(key, C(v))       (C(v) of every chunk, concatenated)

The exchange never looks inside these steps, and the steps never communicate: that is what lets
the same algorithm run on the in-process simulator, on real Horovod ranks and against the plain
single-server oracle. Worker state covers the whole bucket; server state covers only the chunk
this rank owns (``server_message`` receives that chunk and nothing else).

Subclasses keep their state in dicts keyed by bucket so one object serves a whole model, and
return it from :meth:`state_dict` so checkpoints carry every rank's error-feedback state.

Periodic exact steps (LIEC-SGD's synchronisation every ``period`` rounds): when
:meth:`is_sync_step` is true the exchange skips the five steps for every bucket and instead
averages the gradients exactly (dense allreduce), gathers each bucket's server state from
:meth:`server_flush` (which also resets it), and applies ``sync_update(key, mean, flushed)``.

A subclass that sets a class attribute ``name`` registers itself under that name (see
:func:`hvdcomp.algorithms.make_algorithm`); it must also declare ``info``, its
:class:`~hvdcomp.algorithms.registry.MethodInfo` (paper, defaults, options), which registers it
as a training method (:mod:`hvdcomp.algorithms.registry`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type

import torch

from ..compressors import Compressor, from_spec
from .registry import TrainingMethod


#: every Algorithm subclass that sets ``name``, by name (filled by ``Algorithm.__init_subclass__``)
ALGORITHMS: Dict[str, Type["Algorithm"]] = {}


class Algorithm(TrainingMethod):
    #: registry name, e.g. ``"liec"``
    name: str = ""

    def __init_subclass__(cls, **kwargs):
        if cls.__dict__.get("name"):
            if "info" not in cls.__dict__ or cls.__dict__["info"].name != cls.name:
                raise TypeError(f"algorithm class {cls.__name__} ({cls.name!r}) must declare "
                                f"info = MethodInfo(name={cls.name!r}, ...) "
                                "(hvdcomp.algorithms.registry)")
            ALGORITHMS[cls.name] = cls
        super().__init_subclass__(**kwargs)
    #: Whether the downlink is compressed at all; when False the server message travels dense
    #: (``none``), and a ``down`` compressor other than ``none`` is refused at construction.
    compresses_downlink: bool = True
    #: Whether the algorithm feeds compression errors back (every method but P-SGD): it then
    #: needs contractive compressors and refuses others at construction
    #: (:meth:`hvdcomp.compressors.Compressor.contraction_problem`).
    error_feedback: bool = True
    #: The attributes that are this algorithm's state (dicts of tensors keyed by bucket, such as
    #: ``"worker_error"``): what :meth:`state_dict` saves and :meth:`load_state_dict` restores,
    #: listed explicitly as PyTorch's ``PowerSGDState`` lists its fields.  Work buffers and
    #: values that live for one round only are not state and are not listed.
    state_fields: Tuple[str, ...] = ()
    #: Whether the algorithm still reads the buffer handed to ``worker_sent`` after it returns
    #: (LIEC-SGD and CSER keep r_i = p_i − C(p_i) there until ``worker_update``).  An algorithm
    #: that declares False (it only reads C(p_i) inside ``worker_sent``) lets the two-phase
    #: exchange decode C(p_i) into the caller's update buffer, which the server half then
    #: overwrites, instead of a bucket-sized buffer of its own.
    keeps_worker_sent: bool = True
    #: Error steps that are error feedback's residual x − C(x), declared so that the two-phase
    #: exchange may fuse them with the compressor: the residual written over x in the decoder's
    #: pass (one pass for ``sign``) instead of C(x) decoded into a buffer and subtracted.  The
    #: five steps stay the reference (the other patterns run them); the fused rounds equal them
    #: bit for bit (tests/test_fused_residual.py).
    #: ``"kept"``: ``worker_message`` returns the worker error's own storage and ``worker_sent``
    #: is e_i ← p_i − C(p_i) there (MEM-SGD, DoubleSqueeze).  ``"compensated"``: ``worker_sent``
    #: keeps r_i = p_i − C(p_i) for this round and ``worker_update`` returns C(v) + r_i
    #: (LIEC-SGD, CSER); the exchange then keeps r_i in the caller's ``update_into`` and
    #: decodes C(v) onto it.  ``None``: neither (the steps run as written).
    worker_residual: Optional[str] = None
    #: True when ``server_message`` returns the server error's own storage and ``server_sent``
    #: is e ← v − C(v) there (LIEC-SGD, DoubleSqueeze).
    server_residual: bool = False
    #: The state field (a dict of tensors keyed by bucket) into which ``server_message`` adds
    #: the mean in place once the bucket's entry exists, returning it: v = m + e written over e
    #: (LIEC-SGD, DoubleSqueeze).  Declared so that the two-phase exchange may decode the N
    #: payloads onto e in one pass (``Compressor.decompress_mean_add_into``: ``sign``) instead of
    #: decoding m into a buffer for ``server_message`` to add.  None: the step runs as written.
    server_adds_mean_to: Optional[str] = None
    #: The state field (a dict of tensors keyed by bucket) onto which ``worker_message`` adds
    #: the gradient once the bucket's entry exists, ``torch.add(g, e, out=e)``, returning it:
    #: p_i = g_i + e_i written over e_i (MEM-SGD, DoubleSqueeze; with ``worker_residual``
    #: "kept").  Declared so that the two-phase exchange may add g_i in the encoder's pass
    #: (``sign``'s ``chunk_payloads``) instead of a pass of its own.  None: the step runs
    #: as written.
    worker_adds_gradient_to: Optional[str] = None

    def __init__(self, up: "Compressor | str" = "none", down: "Compressor | str | None" = None):
        self.up = from_spec(up)
        self.down = from_spec(down) if down is not None else self.up
        if not self.compresses_downlink:
            if down is not None and self.down.spec() != "none":
                raise ValueError(
                    f"algorithm {self.name!r} sends its downlink dense, as its paper does, so "
                    f"down={self.down.spec()!r} cannot be honoured: leave the downlink "
                    "compressor out, or choose an algorithm that compresses it (doublesqueeze, "
                    "liec, neolithic, ef21bc)")
            self.down = from_spec("none")
        if self.error_feedback:
            for compressor in dict.fromkeys((self.up, self.down)):
                problem = compressor.contraction_problem()
                if problem:
                    raise ValueError(problem)
        self.step = 0  # rounds completed; algorithms with periods read it

    # --- the five steps (defaults: plain averaging, no error feedback) -------------------------
    def worker_message(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        """The vector worker i compresses and sends, from its gradient for this bucket."""
        return grad

    def worker_sent(self, key: str, message: torch.Tensor, sent: torch.Tensor) -> None:
        """Called with C(message) as the server will decode it; update worker errors here."""

    def server_message(self, key: str, mean_received: torch.Tensor) -> torch.Tensor:
        """On the server's chunk: the vector to compress and send down."""
        return mean_received

    def server_sent(self, key: str, message: torch.Tensor, sent: torch.Tensor) -> None:
        """Called with C(message) as the workers will decode it; update server errors here."""

    def worker_update(self, key: str, received: torch.Tensor) -> torch.Tensor:
        """The update direction worker i applies (its optimizer adds weight decay, momentum)."""
        return received

    def uplink_for(self, key: str) -> Compressor:
        """The uplink compressor of bucket ``key`` (DGC compresses per layer: one compressor per
        bucket layout); ``up`` by default."""
        return self.up

    # --- periodic exact steps (defaults: never) -------------------------------------------------
    def is_sync_step(self) -> bool:
        """True when this round is an exact, uncompressed step (LIEC-SGD every ``period`` rounds);
        the optimizer also averages the parameters exactly in such a round."""
        return False

    def server_flush(self, key: str) -> Optional[torch.Tensor]:
        """At a sync step: this rank's server state for ``key`` (its chunk), to be folded into the
        exact step, and reset it. ``None`` means zero."""
        return None

    def sync_update(self, key: str, mean_grad: torch.Tensor,
                    flushed: torch.Tensor) -> torch.Tensor:
        """At a sync step: the update from the exact gradient average and the flushed server
        state (zeros where :meth:`server_flush` returned ``None``). It must be elementwise: with
        the server state sharded (the two-phase pattern) each rank calls it on its own chunk of
        both and broadcasts the result (:func:`hvdcomp.exchange_sync.fold_server_chunks`).
        ``mean_grad`` is the exact round's own allreduce result (the caller's ``update_into``):
        the sum is written there, no fresh bucket (the same float addition)."""
        if flushed.dtype != mean_grad.dtype:
            return mean_grad + flushed                   # type promotion, as before
        return mean_grad.add_(flushed)

    # --- bookkeeping ---------------------------------------------------------------------------
    def end_round(self) -> None:
        """Called by the exchange once every bucket of a step has been exchanged."""
        self.step += 1

    def config(self) -> Dict[str, Any]:
        """Everything ranks must agree on; compared across ranks before the first exchange."""
        return {"algorithm": self.name, "up": self.up.spec(), "down": self.down.spec(),
                **self.hyperparameters()}

    def hyperparameters(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """This rank's error-feedback state, with tensors cloned to CPU-independent copies."""
        state = {"step": self.step, "config": self.config()}
        for attr in self.state_fields:
            state[attr] = {k: v.detach().clone() for k, v in getattr(self, attr).items()}
        return state

    def reset_state(self) -> None:
        """Every :attr:`state_fields` dict emptied (errors at zero) and the round counter at 0:
        the state of a fresh algorithm."""
        for attr in self.state_fields:
            getattr(self, attr).clear()
        self.step = 0

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("config") != self.config():
            raise ValueError(
                f"checkpoint was written by {state.get('config')}, this run is {self.config()}: "
                "resume with the same algorithm and compressors")
        self.step = state["step"]
        for attr, value in state.items():
            if attr in ("step", "config"):
                continue
            if attr not in self.state_fields:
                if isinstance(value, dict) and not value:
                    continue   # older checkpoints saved empty per-round dicts too: nothing to load
                raise ValueError(f"checkpoint holds unknown state {attr!r} for {self.name} "
                                 f"(its state: {', '.join(self.state_fields) or 'none'})")
            current: Dict[str, torch.Tensor] = getattr(self, attr)
            current.clear()
            current.update({k: v.clone() for k, v in value.items()})

    def __repr__(self) -> str:
        return f"<{type(self).__name__} up={self.up.spec()} down={self.down.spec()}>"
