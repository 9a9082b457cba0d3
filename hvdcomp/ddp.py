"""hvdcomp's algorithms as a DDP communication hook: ``DistributedDataParallel`` users keep their
training loop and get bidirectional, error-feedback compression.

    model = DistributedDataParallel(net)
    state = hvdcomp.ddp.register(model, compression=hvdcomp.Compression.liec("sign"))

or, in the form of PyTorch's own hooks (``powerSGD_hook``)::

    state = hvdcomp.ddp.HvdcompState(model, compression=hvdcomp.Compression.liec("sign"))
    model.register_comm_hook(state, hvdcomp.ddp.hook)

**The same exchange as hvdcomp.DistributedOptimizer, bit for bit.** The hook does not compress
DDP's buckets as DDP cuts them (those change after the first iteration, when DDP rebuilds them in
gradient order, and differ from the Horovod engine's). It runs the optimizer's own
:class:`~hvdcomp.optimizer_buckets.BucketReducer` over the model's parameters: the same buckets
(reversed parameter order, ``bucket_bytes``, small tensors uncompressed), names, seeds, chunks and
algorithm state, over a :class:`~hvdcomp.comm.torchdist.TorchDistCommunicator` on DDP's process
group. Each DDP bucket hands in its gradients (views into its buffer); an hvdcomp bucket starts,
in index order, once all its gradients have arrived; the hook of DDP's last bucket finishes every
exchange, writes the updates into DDP's buffers and completes every bucket's future (DDP waits on
them only after backward, so earlier futures may complete last). DDP calls the hook for its
buckets in index order on every rank, so every rank launches the same collectives in the same
order, which the torch engine requires.

**LIEC-SGD's exact rounds**: in a round where ``is_sync_step()`` holds, the exchange returns exact
gradients and the parameters are averaged exactly, as with the optimizer: a compressed bucket's
parameters travel in its gradient's allreduce and are written back when the hook of DDP's last
bucket finishes the exchanges (every gradient has been computed by then: a node that saved a
parameter has run before that parameter's gradient was ready), and the small uncompressed
tensors' parameters are averaged by the reducer's ``before_step`` in a callback queued on the
autograd engine, which runs once backward has finished, before ``optimizer.step()``.

**State** (:class:`HvdcompState`, like PowerSGD's ``PowerSGDState``): its fields are listed in
``__slots__``; pickling keeps the configuration and this rank's error-feedback state (each rank
pickles its own; with LIEC-SGD also the rank's parameters, which drift apart between exact
rounds) and drops the process group, communicator and parameters; after unpickling,
:func:`register` (``register(model, state=state)``) attaches it to a model again.

Compressions: anything ``hvdcomp.Compression`` builds for its algorithms (``.liec``, ``.memsgd``,
``.doublesqueeze``, ``.ef21``, ``.dgc``, ``.algorithm(name, ...)``, or an hvdcomp compressor, which
means P-SGD with it). Horovod-interface compressors (``Compression.none``, ``.fp16``,
``.randomk``) are refused with a pointer to torch's own hooks; ``psgd`` with ``none`` is DDP's
average (equal to DDP's default hook to the last bit on 2 ranks, where both sums are exact).
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from .compression import check_compression, is_stateful
from .optimizer import DEFAULT_BUCKET_BYTES, DEFAULT_SMALL_TENSOR_BYTES
from .optimizer_buckets import Bucket, BucketReducer

NOT_ATTACHED = ("this HvdcompState was unpickled and is not attached to a model: call "
                "hvdcomp.ddp.register(model, state=state) before training")


class _DDPReducer(BucketReducer):
    """The optimizer's bucket reducer, reading gradients from (and writing updates into) the
    views of DDP's bucket buffers instead of ``p.grad`` (which DDP owns: its own
    ``gradient_as_bucket_view`` decides what ``p.grad`` is)."""

    grads_as_bucket_views = False

    def __init__(self, *args, **kwargs):
        self.grads: Dict[int, torch.Tensor] = {}   # id(p) -> this step's gradient in DDP's buffer
        super().__init__(*args, **kwargs)

    def _dense_grad(self, p: torch.Tensor) -> torch.Tensor:
        grad = self.grads.get(id(p))
        return torch.zeros_like(p) if grad is None else grad

    def _write_grads(self, bucket: Bucket, update: torch.Tensor) -> None:
        offset = 0
        for p in bucket.params:
            view = self.grads[id(p)]
            piece = update[offset:offset + p.numel()]
            if view.data_ptr() != piece.data_ptr():   # a one-tensor bucket decodes in place
                view.copy_(piece.view_as(view))
            offset += p.numel()


class HvdcompState:
    """What :func:`hook` needs: the compression, the bucketing, and the reducer that holds the
    algorithm's error-feedback state (see the module docstring).

    ``model``: the ``DistributedDataParallel`` module (its parameters and process group);
    ``compression``: an hvdcomp algorithm compression; ``bucket_bytes``, ``small_tensor_bytes``,
    ``pattern``: as for :func:`hvdcomp.DistributedOptimizer` (defaults 64 MiB, 4096 bytes, the
    algorithm's pattern). Build it on every rank at the same point (it checks, with one
    collective, that every rank has the same configuration and buckets)."""

    __slots__ = (
        "process_group",        # DDP's process group (not pickled)
        "compression",          # the hvdcomp.Compression recipe
        "bucket_bytes",         # hvdcomp's fusion size (not DDP's bucket_cap_mb)
        "small_tensor_bytes",   # tensors below this travel uncompressed
        "pattern",              # exchange pattern, None: the algorithm's default
        "parameter_names",      # the trainable parameters' names, in model order
        "comm",                 # TorchDistCommunicator on process_group (not pickled)
        "reducer",              # _DDPReducer: buckets, exchanges, algorithm state (not pickled)
        "_waiting",             # this step's DDP buckets: (buffer, future), until the last one
        "_saved",               # the unpickled error-feedback state, until attached
    )

    def __init__(self, model: torch.nn.Module, compression: Any, *, process_group=None,
                 bucket_bytes: Optional[int] = None, small_tensor_bytes: Optional[int] = None,
                 pattern: Optional[str] = None):
        self.compression = _check_hook_compression(compression)
        self.bucket_bytes = DEFAULT_BUCKET_BYTES if bucket_bytes is None else int(bucket_bytes)
        self.small_tensor_bytes = (DEFAULT_SMALL_TENSOR_BYTES if small_tensor_bytes is None
                                   else int(small_tensor_bytes))
        self.pattern = pattern
        self.parameter_names: List[str] = []
        self.process_group = process_group
        self.comm = self.reducer = self._saved = None
        self._waiting: List[Tuple[torch.Tensor, torch.futures.Future]] = []
        self.attach(model, process_group)

    # --- building ------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, process_group=None) -> None:
        """Build the communicator and the reducer over ``model``'s trainable parameters (and
        restore the unpickled error-feedback state, if any). Collective."""
        from .comm.torchdist import TorchDistCommunicator

        group = (process_group if process_group is not None
                 else self.process_group if self.process_group is not None
                 else getattr(model, "process_group", None))
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = [n for n, _ in trainable]
        if self.parameter_names and names != self.parameter_names:
            raise ValueError("this state was saved for a model with other parameters ("
                             f"{len(self.parameter_names)} named, first "
                             f"{self.parameter_names[:2]}); attach it to the same model")
        bf16 = [n for n, p in trainable if p.dtype == torch.bfloat16]
        if bf16:
            raise ValueError(f"parameter(s) {bf16[:3]} are bfloat16, which hvdcomp's "
                             "algorithms do not exchange: keep parameters in float32 and "
                             "compute in bfloat16 with torch.autocast")
        self.process_group = group
        self.parameter_names = names
        self.comm = TorchDistCommunicator(group)
        self.reducer = _DDPReducer(
            self.compression.build(), self.comm, trainable, bucket_bytes=self.bucket_bytes,
            small_tensor_bytes=self.small_tensor_bytes, pattern=self.pattern, groups=None,
            op_sum=False, sparse_as_dense=False, names={p: n for n, p in trainable},
            prefix=_prefix(trainable))
        if self._saved is not None:
            self.reducer.load_slice(self._saved)
            self._saved = None

    # --- what the hook does --------------------------------------------------------------------
    def run(self, bucket) -> torch.futures.Future:
        """One DDP bucket: hand its gradients to the reducer (which starts every hvdcomp bucket
        now complete, in index order); at DDP's last bucket finish the step."""
        if self.reducer is None:
            raise RuntimeError(NOT_ATTACHED)
        reducer = self.reducer
        params, grads = bucket.parameters(), bucket.gradients()
        for p, grad in zip(params, grads):
            if id(p) not in reducer._bucket_of:
                raise ValueError(f"DDP's bucket {bucket.index()} holds a parameter of shape "
                                 f"{tuple(p.shape)} that this state does not know: build the "
                                 "state from the DistributedDataParallel model it hooks")
            reducer.grads[id(p)] = grad
        buffer = bucket.buffer()
        # a future that will hold a CUDA tensor must name its device (NCCL)
        future: torch.futures.Future = (torch.futures.Future(devices=[buffer.device])
                                        if buffer.is_cuda else torch.futures.Future())
        self._waiting.append((buffer, future))
        for p in params:
            reducer.ready(p)
        if bucket.is_last():
            self._finish_step()
        return future

    def _finish_step(self) -> None:
        waiting, self._waiting = self._waiting, []
        self.reducer.synchronize()       # every exchange finished, updates in DDP's buffers
        self.reducer.grads.clear()
        if self.reducer._average_before_step:
            # LIEC-SGD's exact round: average the parameters once backward is over
            torch.autograd.Variable._execution_engine.queue_callback(self.reducer.before_step)
        for buffer, future in waiting:
            future.set_result(buffer)

    # --- what users read -----------------------------------------------------------------------
    @property
    def algorithm(self):
        """The algorithm object (e.g. ``state.algorithm.set_epoch(epoch)`` for DGC)."""
        return None if self.reducer is None else self.reducer.algorithm

    @property
    def stats(self):
        """Cumulative bytes up/down, compress and communication time, rounds (this rank)."""
        return None if self.reducer is None else self.reducer.stats

    # --- pickling ------------------------------------------------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        if self._waiting or (self.reducer is not None and self.reducer.in_flight()):
            raise RuntimeError("HvdcompState pickled during backward, with exchanges in "
                               "flight: save it between optimizer steps")
        saved = self.reducer.state_slice() if self.reducer is not None else self._saved
        return {"compression": self.compression, "bucket_bytes": self.bucket_bytes,
                "small_tensor_bytes": self.small_tensor_bytes, "pattern": self.pattern,
                "parameter_names": list(self.parameter_names), "_saved": saved}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        for slot in self.__slots__:
            setattr(self, slot, None)
        for key, value in state.items():
            setattr(self, key, value)
        self._waiting = []


def hook(state: HvdcompState, bucket):
    """The DDP communication hook: ``model.register_comm_hook(state, hvdcomp.ddp.hook)``."""
    return state.run(bucket)


# DDP checks the annotation itself (a string under ``from __future__ import annotations``)
hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]


def register(model: torch.nn.Module, compression: Any = None, *,
             state: Optional[HvdcompState] = None, **options: Any) -> HvdcompState:
    """Register hvdcomp's hook on the DDP ``model``; returns its :class:`HvdcompState`.

    ``compression`` and ``options`` (``process_group``, ``bucket_bytes``, ``small_tensor_bytes``,
    ``pattern``) as for :class:`HvdcompState`; or ``state=`` an unpickled state to attach again.
    Collective: call it on every rank."""
    if not hasattr(model, "register_comm_hook"):
        raise TypeError(f"hvdcomp.ddp.register needs a DistributedDataParallel model, not "
                        f"{type(model).__name__}")
    if state is None:
        state = HvdcompState(model, compression, **options)
    elif compression is not None or options:
        raise ValueError("pass either compression (and options) or state=, not both: an "
                         "unpickled state keeps its own configuration")
    else:
        state.attach(model, getattr(model, "process_group", None))
    model.register_comm_hook(state, hook)
    return state


def _check_hook_compression(compression: Any):
    """An hvdcomp algorithm compression; anything else is refused, naming what to use."""
    if compression is None:
        raise TypeError("hvdcomp.ddp needs compression=, e.g. hvdcomp.Compression.liec('sign') "
                        "(DDP without compression is DDP's default hook)")
    compression = check_compression(compression)
    if not is_stateful(compression):
        raise TypeError(f"{compression!r} has Horovod's Compressor interface (compress / "
                        "decompress around one allreduce), which DDP runs itself: use torch's "
                        "default or fp16_compress_hook from torch.distributed.algorithms."
                        "ddp_comm_hooks, or an hvdcomp algorithm such as "
                        "hvdcomp.Compression.algorithm('psgd', up='fp16')")
    return compression


def _prefix(trainable) -> str:
    """Collective names' prefix: a checksum of the parameters' names, shapes and dtypes."""
    signature = ";".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in trainable)
    return f"hvdcomp.ddp.{zlib.crc32(signature.encode()):08x}"
