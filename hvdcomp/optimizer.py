"""``hvdcomp.DistributedOptimizer``: Horovod's optimizer wrapper, with a compressed exchange.

It takes ``horovod.torch.DistributedOptimizer``'s whole signature (Horovod 0.28.1) with the same
meaning, and behaves like it: ``synchronize()``, ``skip_synchronize()``, the ``zero_grad()`` guard,
``backward_passes_per_step``, Horovod's errors and warnings, word for word. What moves the
gradients depends on ``compression`` (docs/horovod.md has the table of every argument):

* hvdcomp's algorithms (``Compression.liec(...)``, ``.memsgd``, ``Compression.algorithm(...)``):
  the bucketed error-feedback exchange of :mod:`hvdcomp.optimizer_buckets`;
* anything with Horovod's ``Compressor`` interface (``Compression.none``, ``.fp16``,
  ``.randomk(r)``, a user's own class): Horovod's own per-parameter allreduce,
  :mod:`hvdcomp.optimizer_horovod` — with ``Compression.none`` the parameters equal Horovod's
  to the last bit.

An argument that cannot be honoured with the given compression raises one error here, before
anything is registered: nothing passed in is ignored. Weight decay and momentum stay in the
wrapped optimizer: they act on the exchanged update, never on what is compressed.

Collectives carry stable names, ``hvdcomp.<optimizer id>.<bucket or parameter>.<phase>``: the
same every step (Horovod's response cache then skips the negotiation) and unique per optimizer
(the id is a checksum of the parameter names, shapes and dtypes, numbered when two optimizers
share it), so ranks whose hooks fire in different orders pair the right tensors.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
import zlib
from collections import Counter
from typing import Any, Optional

import torch

from . import optimizer_state
from .compression import check_compression
from .optimizer_args import (Setup, build_setup, refuse_wrapped)
from .optimizer_buckets import ExchangeStats

from .optimizer_args import DEFAULT_BUCKET_BYTES, DEFAULT_FIRST_BUCKET_BYTES  # noqa: F401
#: tensors below this many bytes travel uncompressed (a 1024-element fp32 bias or norm)
DEFAULT_SMALL_TENSOR_BYTES = 4096

# Horovod 0.28.1's messages, word for word: scripts and tests filter on them.
STEP_AFTER_SYNCHRONIZE = ("optimizer.step() called without "
                          "optimizer.skip_synchronize() context after "
                          "optimizer.synchronize(). This can cause training "
                          "slowdown. You may want to consider using "
                          "optimizer.skip_synchronize() context if you use "
                          "optimizer.synchronize() in your code.")
TOO_MANY_PASSES = ("Gradients were computed more than "
                   "backward_passes_per_step times before call "
                   "to step(). Increase backward_passes_per_step to "
                   "accumulate gradients locally.")
ZERO_GRAD_RACE = ("optimizer.zero_grad() was called after loss.backward() "
                  "but before optimizer.step() or optimizer.synchronize(). "
                  "This is prohibited as it can cause a race condition.")

_WRAPPED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_SIGNATURES: Counter = Counter()
_WORLD_SIGNATURES: "weakref.WeakKeyDictionary[Any, Counter]" = weakref.WeakKeyDictionary()


class _DistributedOptimizer(torch.optim.Optimizer):
    # Mixed into the user's optimizer class by DistributedOptimizer(), as Horovod does, so
    # isinstance(opt, torch.optim.SGD) still holds and the update rule is the user's.
    _hvdcomp_distributed = True

    def __init__(self, params, setup: Setup):
        super(self.__class__, self).__init__(params)
        # Horovod's attribute names, which scripts and Horovod's tests read
        self._parameter_names = setup.names
        self._compression = setup.compression
        self.backward_passes_per_step = setup.backward_passes_per_step
        self.op = setup.op
        self.gradient_predivide_factor = setup.gradient_predivide_factor
        self.sparse_as_dense = setup.sparse_as_dense
        self.process_set = setup.process_set
        self._requires_update = set(setup.requires_update)
        self._allreduce_delay = {p: setup.backward_passes_per_step for p in setup.requires_update}
        self._reducer = setup.reducer          # None: nothing to exchange on this rank
        self._comm = setup.comm
        self._prefix = setup.prefix
        self._touched: set = set()             # parameters with a backward pass since the sync
        self._synchronized = False
        self._should_synchronize = True
        self._consolidated = None              # every rank's EF state, after consolidate
        self._loaded_entry = None              # the EF entry of the last load_state_dict
        # hvd.broadcast_optimizer_state initialises empty optimizer state by stepping the
        # *wrapped* optimizer's class when optimizer.__module__ is Horovod's optimizer module,
        # and our step() otherwise, which exchanges gradients: a collective on only the ranks
        # whose state was empty (a hang). Recognised as Horovod's, it steps locally, as with
        # Horovod's own optimizer. The class keeps its true module.
        self.__module__ = "horovod.torch.optimizer"
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                       for p in (setup.requires_update if self._reducer is not None else [])]

    # --- hooks ---------------------------------------------------------------------------------
    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if self._allreduce_delay[p] <= 0:
            raise AssertionError(TOO_MANY_PASSES)
        self._allreduce_delay[p] -= 1
        self._touched.add(p)
        if self._allreduce_delay[p] == 0:
            self._reducer.ready(p)
        elif hasattr(self._reducer, "pending"):
            self._reducer.pending(p)

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = passes

    # --- synchronize / step --------------------------------------------------------------------
    def synchronize(self) -> None:
        """Finish every gradient's exchange and write the averages into ``p.grad``."""
        if self._reducer is None:
            self._synchronized = True
            return
        self._reducer.synchronize()
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = self.backward_passes_per_step
        self._touched.clear()
        self._consolidated = None   # the state moved on
        self._loaded_entry = None
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """For ``synchronize(); clip gradients; with skip_synchronize(): step()``."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn(STEP_AFTER_SYNCHRONIZE)
            self.synchronize()
        self._synchronized = False
        if self._reducer is not None:
            self._reducer.before_step()
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if self._touched or (self._reducer is not None and self._reducer.in_flight()):
            raise AssertionError(ZERO_GRAD_RACE)
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    # --- checkpoints (hvdcomp.optimizer_state) -------------------------------------------------
    def _error_feedback(self) -> bool:
        return self._reducer is not None and self._reducer.has_error_feedback

    def state_dict(self):
        if not self._error_feedback():
            return super(self.__class__, self).state_dict()
        root = optimizer_state.broadcast_root()
        restored = False
        if root is not None:  # inside hvd.broadcast_optimizer_state, on every rank
            loaded = optimizer_state.broadcast(self._comm, self._loaded_entry,
                                               optimizer_state.root_in(self._comm, root),
                                               f"{self._prefix}.state.broadcast")
            self._loaded_entry = None
            if loaded is not None:
                optimizer_state.require_every_rank(loaded, self._comm)
                self._load_own(optimizer_state.pick(loaded, self._comm))
                restored = True
        state = super(self.__class__, self).state_dict()
        if restored and self._reducer.replicas_drift():
            # Horovod broadcasts the root's tensors into this dict in place: hand it copies, so
            # each rank keeps the momentum buffers its own slice just restored
            state = copy.deepcopy(state)
        state[optimizer_state.KEY] = optimizer_state.entry(
            self._own_slice(), self._comm, self._reducer.round, self._consolidated)
        return state

    def _own_slice(self):
        """This rank's state: error feedback and, when replicas drift (LIEC-SGD), its own
        parameters and wrapped-optimizer state (rank 0's model and momenta are not its own)."""
        own = self._reducer.state_slice()
        if self._reducer.replicas_drift():
            own["optimizer_state"] = copy.deepcopy(
                super(self.__class__, self).state_dict()["state"])
        return own

    def _load_own(self, own) -> None:
        self._reducer.load_slice(own)
        if "optimizer_state" in own:
            packed = super(self.__class__, self).state_dict()
            packed["state"] = own["optimizer_state"]
            super(self.__class__, self).load_state_dict(packed)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective (every rank calls it): gather every rank's error-feedback state, so that
        rank ``to``'s next ``state_dict()`` holds all of it (one checkpoint file restores every
        rank). Without error feedback there is nothing to gather."""
        if self._error_feedback():
            self._consolidated = optimizer_state.gather(self._own_slice(), self._comm, to,
                                                        f"{self._prefix}.state.gather")

    def load_state_dict(self, state_dict, reset_error_feedback: bool = False):
        """Restore the wrapped optimizer and this rank's error-feedback state (its slice of a
        consolidated checkpoint). ``reset_error_feedback=True`` (on every rank) keeps the
        optimizer's state and starts the error feedback at zero."""
        if self._reducer is not None:
            self._reducer.reset()
        self._touched.clear()
        self._synchronized = False
        self._should_synchronize = True
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = self.backward_passes_per_step
        state_dict = dict(state_dict)
        saved = state_dict.pop(optimizer_state.KEY, None)
        super(self.__class__, self).load_state_dict(state_dict)
        if not self._error_feedback():
            if saved is not None and not reset_error_feedback:
                raise optimizer_state.CheckpointMismatchError(
                    "the checkpoint holds hvdcomp error-feedback state and this optimizer's "
                    f"compression ({self._compression!r}) keeps none: load it with "
                    "reset_error_feedback=True to drop that state")
            return
        if reset_error_feedback:
            self._reducer.reset_error_feedback()
            self._loaded_entry = None
        elif saved is not None:
            self._loaded_entry = optimizer_state.normalise(saved)
            self._load_own(optimizer_state.pick(self._loaded_entry, self._comm))

    # --- what hvdcomp train and the benchmarks read --------------------------------------------
    @property
    def stats(self) -> ExchangeStats:
        return self._reducer.stats if self._reducer is not None else ExchangeStats()

    @property
    def algorithm(self):
        return getattr(self._reducer, "algorithm", None)

    @property
    def exchange(self):
        return getattr(self._reducer, "exchange", None)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None,
                         compression: Any = None, backward_passes_per_step: int = 1,
                         op: Any = None, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups: Any = None, sparse_as_dense: bool = False,
                         process_set: Any = None, *, bucket_bytes: Optional[int] = None,
                         small_tensor_bytes: Optional[int] = None, comm=None,
                         pattern: Optional[str] = None):
    """Wrap ``optimizer`` so that ``step()`` applies the exchanged gradient.

    The arguments up to ``process_set`` are ``horovod.torch.DistributedOptimizer``'s, with the
    same meaning (``op=None`` is ``hvd.Average``, ``process_set=None`` the global set); the
    others shape hvdcomp's bucketed exchange and apply to its algorithms only:
      compression: ``hvdcomp.Compression.liec("sign")`` and friends, or any object with
        Horovod's Compressor interface (default ``Compression.none``: Horovod's allreduce).
      bucket_bytes: fusion buffer size (default 25 MiB, the first bucket 1 MiB, as DDP; given,
        every bucket is this size); a bucket's exchange starts when its
        last gradient is ready.
      small_tensor_bytes: tensors smaller than this (default 4096) travel uncompressed.
      comm: a :class:`hvdcomp.comm.Communicator` (default: Horovod's, after ``hvd.init()``).
      pattern: ``"two_phase"`` (sharded server, default), ``"allgather"`` or ``"allreduce"``.
    """
    refuse_wrapped(optimizer, _WRAPPED)
    compression = check_compression(compression)
    setup = build_setup(
        optimizer, named_parameters=named_parameters, compression=compression,
        backward_passes_per_step=backward_passes_per_step, op=op,
        gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups,
        groups=groups, sparse_as_dense=sparse_as_dense, process_set=process_set,
        bucket_bytes=bucket_bytes, small_tensor_bytes=small_tensor_bytes, comm=comm,
        pattern=pattern, defaults=(DEFAULT_BUCKET_BYTES, DEFAULT_SMALL_TENSOR_BYTES),
        prefix_for=_prefix)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               dict(_DistributedOptimizer.__dict__))
    wrapped = cls(optimizer.param_groups, setup)
    _WRAPPED.add(optimizer)
    _WRAPPED.add(wrapped)
    return wrapped


def _prefix(named, comm) -> str:
    """A name prefix the same on every rank and different for each optimizer of a process: a
    checksum of the parameters, numbered when optimizers of one world share it (ranks build
    their optimizers in the same order, as Horovod requires too). Ranks outside a process set
    count too, so that later optimizers keep the same numbers on every rank."""
    signature = ";".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in named)
    checksum = zlib.crc32(signature.encode())
    world = getattr(comm, "world", None)
    if world is None:        # one rank per process (Horovod)
        counts, key = _SIGNATURES, checksum
    else:                    # a simulated world: all its ranks in this process, counted apart
        counts = _WORLD_SIGNATURES.setdefault(world, Counter())
        key = (comm.rank, checksum)
    index = counts[key]
    counts[key] += 1
    return f"hvdcomp.{checksum:08x}.{index}"
