"""The exchange: how one round of an algorithm moves bytes between ranks.

    exchange = Exchange(make_algorithm("liec", up="sign"), comm)       # comm: any Communicator
    exchange.prepare({"b0": (n0, torch.float32), "b1": (n1, torch.float32)})   # config check
    handles = [exchange.start(key, grad) for key, grad in buckets]     # e.g. during backward
    updates = [exchange.finish(h) for h in handles]                     # same order on all ranks
    exchange.end_round()                                                # once per optimizer step

Three patterns (``pattern=``), all driving the five steps of :mod:`hvdcomp.algorithms.base`:

``"two_phase"`` (default) — the sharded server of docs/design.md. Rank j is the server for chunk
    j of every bucket. Uplink: one ``alltoall`` of the packed chunk payloads of C_up(p_i); server:
    rank j decodes the N payloads of its chunk, averages them in rank order, runs the server
    steps, compresses with C_down; downlink: one ``allgather`` of the server payloads; every rank
    decodes the whole bucket and runs ``worker_update``. Bytes per rank ≈ 2·(N−1)/N·|C(bucket)|.
``"allgather"`` — what GRACE and DGC do: every worker's whole compressed vector is allgathered,
    every rank decodes all N and averages; the server steps run replicated on every rank over the
    whole bucket and nothing is compressed on the way down (C_down = identity). Bytes per rank
    ≈ (N−1)·|C(bucket)|, growing with N.
``"allreduce"`` — for linear compressors only (``none``, ``fp16``, shared-seed random-k):
    the payload values are averaged by an allreduce and decoded once; server steps replicated as
    for ``"allgather"``.

Rounds in which ``algorithm.is_sync_step()`` holds (LIEC-SGD every ``period`` rounds) are exact:
``start`` launches a dense allreduce average of the gradient and an allgather of the server state
(``algorithm.server_flush``, each chunk from its owner), and ``finish`` returns
``algorithm.sync_update(key, mean, flushed)``. In such a round the optimizer also calls
:meth:`Exchange.average_parameters`.

Byte accounting (``bytes_up``, ``bytes_down``, ``bytes_by_phase``; cumulative, per rank): the
bytes of payload *this rank sends to other ranks*, as if every collective were point-to-point
sends; bytes a rank sends itself are not counted, nor are the collectives' own headers, nor the
one-time configuration check. Two-phase uplink: Σ_{j≠rank} |payload of chunk j|; downlink:
(N−1)·|server payload of this rank's chunk|. Allgather uplink: (N−1)·|payload|, downlink 0.
Allreduces (``"allreduce"`` pattern, sync rounds, parameter averaging) are counted as a ring
allreduce sends: the reduce-scatter half as uplink, Σ_{j≠rank} |piece j|, the allgather half as
downlink, (N−1)·|piece rank|, pieces cut by the chunking rule; the real bytes depend on the MPI
or NCCL algorithm. The allgather of the server state in a sync round is counted as downlink, and
so is the allgather of the chunks' L1 norms that ``sign`` needs on the downlink ((N−1)·8 bytes).

Chunking (:func:`chunk_bounds`): a bucket of d elements is cut into N chunks of
``ceil(d/N)`` elements rounded up to a multiple of ``alignment``; the last chunks may be shorter
or empty (an empty chunk sends 0 bytes, its compressor is never called). ``alignment`` defaults
to lcm(64, block sizes of the compressors), so that bit-packed chunks are whole bytes and blocks
never straddle chunks: a blockwise compressor then gives the same result sharded as on the whole
bucket. A block larger than ceil(d/N) therefore concentrates a bucket on few ranks (load
imbalance, bytes no longer flat in N): keep blocks well below bucket size / N, or pass
``alignment=64`` and accept that blocks restart at chunk boundaries.

Buffers: a round on CPU costs memory passes, and writing a freshly allocated large tensor costs
page faults worth several passes, so the two-phase round decodes chunks straight into slices of
buffers (``Compressor.decompress_into``/``roundtrip_into``, no ``torch.cat``) that it keeps per
bucket across rounds (:meth:`Exchange._scratch`): C(p_i) handed to ``worker_sent``, the mean
handed to ``server_message`` (two-phase), C(v) handed to ``server_sent``, and the addend of the
mean.  Algorithms therefore copy what they keep from these arguments (subtracting or adding them,
as every in-tree algorithm does).  The exchange does not read the mean again after
``server_message``, nor the received C(v) after ``worker_update`` (a fresh tensor, as it may be
returned): the steps may add into them in place (LIEC-SGD, DoubleSqueeze do).  Large fresh CPU
tensors are allocated through numpy (``compressors._wire.allocate``: transparent huge pages,
fewer page faults).  The values are those of the plain formulas, bit for bit; only the number of
passes changes.

Names: every collective is called ``<name_prefix>.<key>.<phase>`` (``name_prefix`` defaults to
``hvdcomp``), the same every round; ``start`` may be called in
any order across ranks (collectives pair by name, the configuration check of a bucket first seen
by ``start`` too), but ``finish`` must be called in the same
bucket order on every rank, because ``finish`` issues the downlink collective and waits for it.
"""
from __future__ import annotations

import json
import math
import zlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .algorithms.base import Algorithm
from .comm.base import Communicator, Handle, framed, scale_like_horovod, unframe
from .compressors import Compressor
from .compressors._wire import allocate

from .errors import UserError

PATTERNS = ("two_phase", "allgather", "allreduce")
#: smallest chunk alignment in elements: 64 keeps 1-bit payloads whole bytes (and 2-, 4-bit ones)
BASE_ALIGNMENT = 64

BucketSpec = Union[torch.Tensor, int, Tuple[int, torch.dtype]]


class ConfigMismatchError(UserError, ValueError):
    """Ranks disagree on the algorithm, compressors, pattern or bucket sizes."""


def chunk_bounds(numel: int, size: int, alignment: int = BASE_ALIGNMENT) -> List[Tuple[int, int]]:
    """``[(start, stop)]`` of the chunk each of ``size`` ranks owns in a bucket of ``numel``."""
    if size < 1 or alignment < 1 or numel < 0:
        raise ValueError(f"chunk_bounds needs numel ≥ 0, size ≥ 1, alignment ≥ 1; got "
                         f"{numel}, {size}, {alignment}")
    per_rank = math.ceil(numel / size)
    per_rank = math.ceil(per_rank / alignment) * alignment
    return [(min(j * per_rank, numel), min((j + 1) * per_rank, numel)) for j in range(size)]


def default_alignment(*compressors: Compressor) -> int:
    """lcm of :data:`BASE_ALIGNMENT` and the ``block`` of any blockwise compressor."""
    alignment = BASE_ALIGNMENT
    for compressor in compressors:
        block = getattr(compressor, "block", None)
        if isinstance(block, int) and not isinstance(block, bool) and block > 0:
            alignment = alignment * block // math.gcd(alignment, block)
    return alignment


def summable_dtype(compressor: Compressor, dtype: torch.dtype) -> torch.dtype:
    """The dtype to view a linear compressor's payload as, so that an allreduce sums payloads
    (``compressor.wire_dtype(dtype)``); a clear ValueError for compressors that are not linear."""
    if not compressor.linear:
        raise ValueError(f"pattern 'allreduce' needs a linear compressor (payloads that can be "
                         f"summed); {compressor.spec()!r} is not: use pattern 'two_phase' or "
                         "'allgather'")
    try:
        return compressor.wire_dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"pattern 'allreduce': {exc}; use pattern 'two_phase'") from None


def _nbytes(tensor_numel: int, dtype: torch.dtype) -> int:
    return tensor_numel * torch.empty((), dtype=dtype).element_size()


class ExchangeHandle:
    """One bucket's exchange in flight: returned by :meth:`Exchange.start`, consumed by
    :meth:`Exchange.finish`."""

    def __init__(self, key: str, round_: int, kind: str, shape: torch.Size, dtype: torch.dtype,
                 pending: Dict[str, Handle], **context: Any):
        self.key = key
        self.round = round_
        self.kind = kind          # "two_phase" | "allgather" | "allreduce" | "sync"
        self.shape = shape
        self.dtype = dtype
        self.pending = pending
        self.context = context
        self.finished = False

    def __repr__(self) -> str:
        return f"<ExchangeHandle {self.key!r} round {self.round} {self.kind}>"


class Exchange:
    """Runs ``algorithm`` over ``comm`` with the collective ``pattern`` (see module docstring).

    Attributes ``bytes_up``, ``bytes_down`` (cumulative bytes this rank sent, see the module
    docstring), ``bytes_by_phase`` (the same split by phase) and ``last_round_bytes``
    (``{"up", "down"}`` of the last completed round) are read by the optimizer and benchmarks.
    """

    def __init__(self, algorithm: Algorithm, comm: Communicator, pattern: str = "two_phase",
                 alignment: Optional[int] = None, seed: int = 0):
        if pattern not in PATTERNS:
            raise ValueError(f"unknown exchange pattern {pattern!r}; choose one of: "
                             f"{', '.join(PATTERNS)}")
        if not isinstance(algorithm, Algorithm):
            raise ValueError(f"algorithm must be an hvdcomp Algorithm (make_algorithm(...)), not "
                             f"{type(algorithm).__name__}")
        self.algorithm = algorithm
        self.comm = comm
        self.pattern = pattern
        self.seed = int(seed)
        self.alignment = int(alignment) if alignment is not None else default_alignment(
            algorithm.up, algorithm.down)
        if self.alignment < 1:
            raise ValueError(f"alignment must be a positive number of elements, not {alignment}")
        if pattern == "allreduce":
            summable_dtype(algorithm.up, torch.float32)  # refuse non-linear compressors now
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_by_phase: Dict[str, int] = {}
        self.last_round_bytes = {"up": 0, "down": 0}
        self._round_start = (0, 0)
        self._buckets: Dict[str, Tuple[int, torch.dtype]] = {}   # checked across ranks
        self._checks = 0
        self._in_flight: Dict[str, ExchangeHandle] = {}
        self._done_this_round: set = set()
        # per (bucket, role) buffers reused across rounds (see _scratch); not state
        self._scratch_buffers: Dict[Tuple[str, str], torch.Tensor] = {}

    # --- public API ----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def round(self) -> int:
        """Rounds completed (the algorithm's ``step``); names collectives and seeds."""
        return self.algorithm.step

    def config(self) -> Dict[str, Any]:
        """Everything ranks must agree on, apart from the bucket sizes."""
        return {"pattern": self.pattern, "alignment": self.alignment, "seed": self.seed,
                "world_size": self.size, **self.algorithm.config()}

    def prepare(self, buckets: Mapping[str, BucketSpec]) -> None:
        """Check, with one collective, that every rank has the same configuration and the same
        buckets (key → tensor, numel, or ``(numel, dtype)``); raises :class:`ConfigMismatchError`
        on every rank, naming the setting that differs. Call it once with all buckets before the
        first round (every rank calls ``prepare`` the same number of times).

        A key first seen by :meth:`start` is checked then, alone, by a collective named after the
        key and verified in :meth:`finish` (hooks may start buckets in different orders on
        different ranks): that catches a different configuration or bucket size, but ranks with
        different bucket *keys* would wait for each other forever, which only ``prepare`` with
        all buckets rules out."""
        specs = self._new_buckets(buckets)
        name = f"hvdcomp.config.prepare.{self._checks}"
        self._checks += 1
        self._verify_config(self._post_config(specs, name))
        self._buckets.update(specs)

    def _new_buckets(self, buckets: Mapping[str, BucketSpec]) -> Dict[str, Tuple[int, torch.dtype]]:
        specs = {str(key): self._bucket_spec(key, spec) for key, spec in buckets.items()}
        for key, spec in specs.items():
            if key in self._buckets and self._buckets[key] != spec:
                raise ValueError(f"bucket {key!r} was prepared as {self._buckets[key]} and is "
                                 f"now {spec}: a bucket's size and dtype cannot change")
        return specs

    def layout(self, key: str) -> List[Tuple[int, int]]:
        """The ``(start, stop)`` of each rank's chunk of bucket ``key`` (two-phase pattern)."""
        return chunk_bounds(self._buckets[key][0], self.size, self.alignment)

    def is_sync_step(self) -> bool:
        """True when this round is an exact one (the optimizer then calls average_parameters)."""
        return self.algorithm.is_sync_step()

    def start(self, key: str, grad: torch.Tensor) -> ExchangeHandle:
        """Launch the exchange of bucket ``key`` with this rank's gradient ``grad`` (any shape;
        treated as flat). Non-blocking. The first time a key is seen without :meth:`prepare`, its
        configuration check is launched too and verified by :meth:`finish`."""
        key = str(key)
        if key in self._in_flight or key in self._done_this_round:
            raise ValueError(f"bucket {key!r} was already exchanged in round {self.round}: call "
                             "exchange.end_round() once per optimizer step, after every finish()")
        if not grad.is_floating_point():
            raise ValueError(f"bucket {key!r}: gradients must be floating point, not {grad.dtype}")
        spec = (grad.numel(), grad.dtype)
        config_check = None
        if key not in self._buckets:
            # launched, not awaited: hooks may start buckets in different orders on different
            # ranks, and a blocking check here would deadlock them; finish() verifies it first
            config_check = self._post_config({key: spec}, f"hvdcomp.config.bucket.{key}")
            self._buckets[key] = spec
        elif self._buckets[key] != spec:
            raise ValueError(f"bucket {key!r} holds {self._buckets[key][0]} elements of "
                             f"{self._buckets[key][1]}, got {spec[0]} of {spec[1]}: a bucket's "
                             "size and dtype are fixed at its first exchange")
        flat = grad.detach().reshape(-1)
        if self.algorithm.is_sync_step():
            handle = self._start_sync(key, flat)
        elif self.pattern == "two_phase":
            handle = self._start_two_phase(key, flat)
        elif self.pattern == "allgather":
            handle = self._start_allgather(key, flat)
        else:
            handle = self._start_allreduce(key, flat)
        handle.shape = grad.shape
        if config_check is not None:
            handle.pending["config"] = config_check
        self._in_flight[key] = handle
        return handle

    def finish(self, handle: ExchangeHandle) -> torch.Tensor:
        """Wait for ``handle``'s collectives, run the server and worker steps; returns the update
        direction ``u_i`` for this bucket, shaped like the gradient given to :meth:`start`."""
        if handle.finished or self._in_flight.get(handle.key) is not handle:
            raise ValueError(f"{handle!r} is not in flight on this exchange (finished twice, or "
                             "started on another exchange)")
        if "config" in handle.pending:
            self._verify_config(handle.pending.pop("config"))
        finish = {"two_phase": self._finish_two_phase, "allgather": self._finish_allgather,
                  "allreduce": self._finish_allreduce, "sync": self._finish_sync}[handle.kind]
        update = finish(handle).reshape(handle.shape)
        handle.finished = True
        del self._in_flight[handle.key]
        self._done_this_round.add(handle.key)
        return update

    def exchange(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        """``finish(start(key, grad))``."""
        return self.finish(self.start(key, grad))

    def end_round(self) -> None:
        """Close the round: every started bucket must be finished. Advances the algorithm's step."""
        if self._in_flight:
            raise ValueError(f"end_round() with buckets still in flight: "
                             f"{sorted(self._in_flight)}; finish() them first")
        self.algorithm.end_round()
        self._done_this_round.clear()
        self.last_round_bytes = {"up": self.bytes_up - self._round_start[0],
                                 "down": self.bytes_down - self._round_start[1]}
        self._round_start = (self.bytes_up, self.bytes_down)

    def average_parameters(self, tensors: Iterable[torch.Tensor]) -> None:
        """Replace every tensor, in place, by its exact average over ranks (dense allreduce). The
        optimizer calls it in sync rounds (LIEC-SGD), before applying the update; every rank
        must pass the same tensors in the same order."""
        tensors = list(tensors)
        handles = [self.comm.allreduce_async(t.detach(), self._name(f"params{i}", "sync_params"),
                                             "average")
                   for i, t in enumerate(tensors)]
        for tensor, handle in zip(tensors, handles):
            averaged = handle.wait()
            with torch.no_grad():
                tensor.copy_(averaged.reshape(tensor.shape))
            self._count_ring_allreduce("sync_params", tensor.numel(), tensor.dtype)

    def state_dict(self) -> Dict[str, Any]:
        """The byte counters and the algorithm's state (checkpoints; resuming keeps cumulative
        byte counts)."""
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "bytes_by_phase": dict(self.bytes_by_phase),
                "algorithm": self.algorithm.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.algorithm.load_state_dict(state["algorithm"])
        self.bytes_up, self.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
        self.bytes_by_phase = dict(state["bytes_by_phase"])
        self._round_start = (self.bytes_up, self.bytes_down)

    # --- the two-phase sharded server ----------------------------------------------------------
    def _start_two_phase(self, key: str, flat: torch.Tensor) -> ExchangeHandle:
        algo, up = self.algorithm, self._uplink(key)
        bounds = chunk_bounds(flat.numel(), self.size, self.alignment)
        message = algo.worker_message(key, flat)
        bucket = self._worker_bucket_norm(up, message)
        # C(p_i), chunk by chunk, decoded straight into one reused buffer (no torch.cat)
        sent = self._scratch(key, "sent", flat.numel(), flat.dtype, flat.device)
        payloads = [self._roundtrip_into(up, message[start:stop], sent[start:stop],
                                         self._seed(key, "up", j), bucket)
                    for j, (start, stop) in enumerate(bounds)]
        algo.worker_sent(key, message, sent)
        splits = [p.numel() for p in payloads]
        self._count("uplink", up_bytes=sum(s for j, s in enumerate(splits) if j != self.rank))
        pending = {"uplink": self.comm.alltoall_async(
            torch.cat(payloads), splits, self._name(key, "up"))}
        return ExchangeHandle(key, self.round, "two_phase", flat.shape, flat.dtype, pending,
                              bounds=bounds)

    def _finish_two_phase(self, handle: ExchangeHandle) -> torch.Tensor:
        algo, key, dtype = self.algorithm, handle.key, handle.dtype
        bounds = handle.context["bounds"]
        start, stop = bounds[self.rank]
        own = stop - start
        # server: decode the N payloads of the chunk this rank owns, average in rank order
        received, _ = handle.pending["uplink"].wait()
        up = self._uplink(key)
        sizes = [self._payload_nbytes(up, own, dtype)] * self.size
        mean = self._decode_mean(up, key, _split(received, sizes, key), own, dtype,
                                 self._seed(key, "up", self.rank), received.device, reuse=True)
        server_message = algo.server_message(key, mean)
        decoded = self._scratch(key, "server_sent", own, dtype, server_message.device)
        bucket = self._server_bucket_norm(key, algo.down, server_message, bounds[-1][1])
        payload = self._roundtrip_into(algo.down, server_message, decoded,
                                       self._seed(key, "down", self.rank), bucket)
        algo.server_sent(key, server_message, decoded)
        self._count("downlink", down_bytes=(self.size - 1) * payload.numel())
        # downlink: one allgather of the server payloads; decode the whole bucket into one
        # fresh tensor (it is returned, so it cannot be a reused buffer)
        gathered = self.comm.allgather(payload, self._name(key, "down"))
        sizes = [self._payload_nbytes(algo.down, b - a, dtype) for a, b in bounds]
        received_update = allocate(bounds[-1][1], dtype, gathered.device)
        for j, (p, (a, b)) in enumerate(zip(_split(gathered, sizes, key), bounds)):
            self._decode_into(algo.down, p, received_update[a:b], self._seed(key, "down", j))
        return algo.worker_update(key, received_update)

    # A compressor that declares ``needs_bucket_norm`` (``sign``: one scale per bucket, as the
    # papers' SignSGD) is handed ``bucket=(‖bucket‖₁, numel)`` with each chunk, so that sharding
    # the bucket over N ranks does not change its output.  The worker holds the whole bucket; the
    # servers each hold one chunk and add their chunks' norms with one allgather of N numbers
    # (summed in rank order: the same total on every rank).
    @staticmethod
    def _worker_bucket_norm(compressor: Compressor, message: torch.Tensor):
        if not getattr(compressor, "needs_bucket_norm", False):
            return None
        return compressor.partial_norm(message), message.numel()

    def _server_bucket_norm(self, key: str, compressor: Compressor, chunk: torch.Tensor,
                            numel: int):
        if not getattr(compressor, "needs_bucket_norm", False):
            return None
        mine = compressor.partial_norm(chunk).to(torch.float64).reshape(1)
        norms = self.comm.allgather(mine, self._name(key, "down_norm"))
        self._count("downlink_norm", down_bytes=(self.size - 1) * _nbytes(1, torch.float64))
        total = norms[0].clone()
        for norm in norms[1:]:
            total += norm
        return total, numel

    # --- allgather (GRACE/DGC) -----------------------------------------------------------------
    def _start_allgather(self, key: str, flat: torch.Tensor) -> ExchangeHandle:
        algo, up = self.algorithm, self._uplink(key)
        message = algo.worker_message(key, flat)
        sent = self._scratch(key, "sent", flat.numel(), flat.dtype, flat.device)
        payload = self._roundtrip_into(up, message, sent, self._seed(key, "up", 0))
        algo.worker_sent(key, message, sent)
        self._count("uplink", up_bytes=(self.size - 1) * payload.numel())
        pending = {"uplink": self.comm.allgather_async(payload, self._name(key, "up"))}
        return ExchangeHandle(key, self.round, "allgather", flat.shape, flat.dtype, pending)

    def _finish_allgather(self, handle: ExchangeHandle) -> torch.Tensor:
        key, dtype = handle.key, handle.dtype
        numel = handle.shape.numel()
        gathered = handle.pending["uplink"].wait()
        up = self._uplink(key)
        sizes = [self._payload_nbytes(up, numel, dtype)] * self.size
        mean = self._decode_mean(up, key, _split(gathered, sizes, key), numel, dtype,
                                 self._seed(key, "up", 0), gathered.device)
        return self._replicated_server(key, mean)

    # --- allreduce (linear compressors) --------------------------------------------------------
    def _start_allreduce(self, key: str, flat: torch.Tensor) -> ExchangeHandle:
        algo = self.algorithm
        message = algo.worker_message(key, flat)
        payload, decoded = self._roundtrip(algo.up, message, self._seed(key, "up", 0))
        algo.worker_sent(key, message, decoded)
        wire = summable_dtype(algo.up, flat.dtype)
        values = payload.view(wire)
        self._count_ring_allreduce("allreduce", values.numel(), wire)
        pending = {"allreduce": self.comm.allreduce_async(values, self._name(key, "allreduce"),
                                                          "average")}
        return ExchangeHandle(key, self.round, "allreduce", flat.shape, flat.dtype, pending,
                              wire=wire)

    def _finish_allreduce(self, handle: ExchangeHandle) -> torch.Tensor:
        algo = self.algorithm
        averaged = handle.pending["allreduce"].wait()
        # decoded into a fresh tensor: the server steps may add into the mean in place, and a
        # linear compressor's decompress may return a view of its payload
        mean = allocate(handle.shape.numel(), handle.dtype, averaged.device)
        self._decode_into(algo.up, averaged.view(torch.uint8), mean,
                          self._seed(handle.key, "up", 0))
        return self._replicated_server(handle.key, mean)

    def _replicated_server(self, key: str, mean: torch.Tensor) -> torch.Tensor:
        """Server steps run on every rank over the whole bucket; no downlink compression."""
        algo = self.algorithm
        server_message = algo.server_message(key, mean)
        algo.server_sent(key, server_message, server_message)
        return algo.worker_update(key, server_message)

    # --- exact (sync) rounds -------------------------------------------------------------------
    def _start_sync(self, key: str, flat: torch.Tensor) -> ExchangeHandle:
        pending = {"gradient": self.comm.allreduce_async(flat, self._name(key, "sync_grad"),
                                                         "average")}
        self._count_ring_allreduce("sync_grad", flat.numel(), flat.dtype)
        flushed = self.algorithm.server_flush(key)
        if self.pattern == "two_phase":
            start, stop = chunk_bounds(flat.numel(), self.size, self.alignment)[self.rank]
            if flushed is None:
                flushed = flat.new_zeros(stop - start)
            if flushed.numel() != stop - start:
                raise ValueError(f"bucket {key!r}: server_flush returned {flushed.numel()} "
                                 f"elements for a chunk of {stop - start}")
            self._count("sync_server_error",
                        down_bytes=(self.size - 1) * _nbytes(flushed.numel(), flushed.dtype))
            pending["server_error"] = self.comm.allgather_async(
                flushed.to(flat.dtype), self._name(key, "sync_error"))
        else:  # replicated server state: every rank holds the whole bucket's
            local = flat.new_zeros(flat.numel()) if flushed is None else flushed
            pending["server_error"] = Handle.done(local)
        return ExchangeHandle(key, self.round, "sync", flat.shape, flat.dtype, pending)

    def _finish_sync(self, handle: ExchangeHandle) -> torch.Tensor:
        mean = handle.pending["gradient"].wait()
        flushed = handle.pending["server_error"].wait()
        return self.algorithm.sync_update(handle.key, mean, flushed)

    # --- helpers -------------------------------------------------------------------------------
    def _uplink(self, key: str) -> Compressor:
        """The uplink compressor of bucket ``key``: ``algorithm.uplink_for(key)`` when the
        algorithm compresses buckets differently (DGC per layer: one compressor per bucket
        layout), else ``algorithm.up``."""
        per_bucket = getattr(self.algorithm, "uplink_for", None)
        return per_bucket(key) if per_bucket is not None else self.algorithm.up

    #: first part of every collective's name; an owner that runs several exchanges over one
    #: communicator (each hvdcomp.DistributedOptimizer) sets its own, so names never collide
    name_prefix = "hvdcomp"

    def _name(self, key: str, phase: str) -> str:
        # The same name every round: Horovod's response cache keeps one entry per collective
        # and skips the negotiation; a round number here made every step's names new, evicting
        # the cache. Unique among collectives in flight, since a round finishes every bucket
        # before the next starts (end_round refuses otherwise).
        return f"{self.name_prefix}.{key}.{phase}"

    def _seed(self, key: str, direction: str, chunk: int) -> int:
        """Shared by every rank for the same round, bucket, direction and chunk (random-k draws
        the same indices everywhere); crc32, not hash(), which differs between processes."""
        text = f"{self.seed}:{key}:{self.round}:{direction}:{chunk}"
        return zlib.crc32(text.encode()) & 0x7FFFFFFF

    @staticmethod
    def _payload_nbytes(compressor: Compressor, numel: int, dtype: torch.dtype) -> int:
        return compressor.payload_nbytes(numel, dtype) if numel else 0

    @staticmethod
    def _roundtrip(compressor: Compressor, x: torch.Tensor, seed: int):
        """(payload, C(x)); an empty chunk sends nothing and never reaches the compressor."""
        if x.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=x.device), x.clone()
        payload, decoded = compressor.roundtrip(x.contiguous(), seed)
        expected = compressor.payload_nbytes(x.numel(), x.dtype)
        if payload.dtype != torch.uint8 or payload.numel() != expected:
            raise ValueError(f"compressor {compressor.spec()!r} returned {payload.numel()} "
                             f"{payload.dtype} bytes for {x.numel()} elements; payload_nbytes "
                             f"says {expected} uint8")
        return payload, decoded

    @staticmethod
    def _roundtrip_into(compressor: Compressor, x: torch.Tensor, out: torch.Tensor,
                        seed: int, bucket=None) -> torch.Tensor:
        """:meth:`_roundtrip` with C(x) written into ``out``; returns the payload.  ``bucket``:
        the bucket's norm for a compressor that ``needs_bucket_norm`` (``sign``)."""
        if x.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=x.device)
        extra = {} if bucket is None else {"bucket": bucket}
        payload = compressor.roundtrip_into(x.contiguous(), out, seed, **extra)
        expected = compressor.payload_nbytes(x.numel(), x.dtype)
        if payload.dtype != torch.uint8 or payload.numel() != expected:
            raise ValueError(f"compressor {compressor.spec()!r} returned {payload.numel()} "
                             f"{payload.dtype} bytes for {x.numel()} elements; payload_nbytes "
                             f"says {expected} uint8")
        return payload

    @staticmethod
    def _decode_into(compressor: Compressor, payload: torch.Tensor, out: torch.Tensor,
                     seed: int) -> torch.Tensor:
        if out.numel():
            compressor.decompress_into(payload, out, seed)
        return out

    def _decode_mean(self, compressor: Compressor, key: str, payloads: Sequence[torch.Tensor],
                     numel: int, dtype: torch.dtype, seed: int, device,
                     reuse: bool = False) -> torch.Tensor:
        """(C_0 + C_1 + ... + C_{N−1}) · (1/N) of the decoded payloads: summed left to right so
        that every rank, the simulator and the oracle add in the same order, and scaled as
        Horovod's ``Average`` scales (times 1/N in the tensor's dtype, not divided by N), so that
        with the identity compressor the two-phase average equals ``hvd.allreduce(op=Average)``
        whenever the sum itself is exact.  No tensor per payload: the first is decoded into the
        result, the others one after the other into a reused buffer that is added in.  The
        result is fresh, or with ``reuse`` a buffer kept for the bucket (two-phase server: the
        mean never leaves the round)."""
        mean = (self._scratch(key, "mean", numel, dtype, device) if reuse
                else allocate(numel, dtype, device))
        if not numel:
            return mean
        self._decode_into(compressor, payloads[0], mean, seed)
        if len(payloads) > 1:
            addend = self._scratch(key, "addend", numel, dtype, device)
            for payload in payloads[1:]:
                mean.add_(self._decode_into(compressor, payload, addend, seed))
        return scale_like_horovod(mean, 1.0 / len(payloads))

    def _scratch(self, key: str, role: str, numel: int, dtype: torch.dtype,
                 device) -> torch.Tensor:
        """A buffer of ``numel`` elements kept for bucket ``key`` across rounds (its contents
        are garbage).  What the exchange hands to ``worker_sent``/``server_sent`` as C(·) lives
        in such buffers: an algorithm must copy what it keeps from them (all in-tree algorithms
        do: they subtract or add them), because the next round overwrites them."""
        buffer = self._scratch_buffers.get((key, role))
        if (buffer is None or buffer.numel() != numel or buffer.dtype != dtype
                or buffer.device != torch.device(device)):
            buffer = allocate(numel, dtype, device)
            self._scratch_buffers[(key, role)] = buffer
        return buffer

    def _count(self, phase: str, up_bytes: int = 0, down_bytes: int = 0) -> None:
        self.bytes_up += up_bytes
        self.bytes_down += down_bytes
        self.bytes_by_phase[phase] = self.bytes_by_phase.get(phase, 0) + up_bytes + down_bytes

    def _count_ring_allreduce(self, phase: str, numel: int, dtype: torch.dtype) -> None:
        pieces = chunk_bounds(numel, self.size, 1)
        up = sum(_nbytes(b - a, dtype) for j, (a, b) in enumerate(pieces) if j != self.rank)
        a, b = pieces[self.rank]
        self._count(phase, up_bytes=up, down_bytes=(self.size - 1) * _nbytes(b - a, dtype))

    @staticmethod
    def _bucket_spec(key: str, spec: BucketSpec) -> Tuple[int, torch.dtype]:
        if isinstance(spec, torch.Tensor):
            return (spec.numel(), spec.dtype)
        if isinstance(spec, int) and not isinstance(spec, bool):
            return (spec, torch.float32)
        if (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], int)
                and isinstance(spec[1], torch.dtype)):
            return (int(spec[0]), spec[1])
        raise ValueError(f"bucket {key!r}: give a tensor, a number of elements or "
                         f"(numel, dtype), not {spec!r}")

    def _post_config(self, buckets: Mapping[str, Tuple[int, torch.dtype]], name: str) -> Handle:
        """Launch the allgather of this rank's configuration as JSON bytes; :meth:`_verify_config`
        compares the gathered documents. Every rank sees the same documents, so every rank
        raises the same error."""
        document = {"exchange": self.config(),
                    "buckets": {k: [n, str(d)] for k, (n, d) in sorted(buckets.items())}}
        data = json.dumps(document, sort_keys=True, default=str).encode()
        return self.comm.allgather_async(framed(data), name)

    def _verify_config(self, check: Handle) -> None:
        documents = [json.loads(data) for data in unframe(check.wait(), self.size)]
        differences = config_differences(documents)
        if differences:
            raise ConfigMismatchError(
                "ranks disagree on their hvdcomp configuration, so their exchanges cannot pair: "
                + "; ".join(differences)
                + ". Start every rank with the same algorithm, compressors, exchange pattern and "
                  "model (same buckets)")


def _split(buffer: torch.Tensor, sizes: Sequence[int], key: str) -> Tuple[torch.Tensor, ...]:
    if sum(sizes) != buffer.numel():
        raise ValueError(f"bucket {key!r}: received {buffer.numel()} payload bytes, expected "
                         f"{sum(sizes)}; ranks disagree on the compressor or the bucket size")
    return torch.split(buffer, list(sizes))


def _flatten(document: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(document, dict):
        flat: Dict[str, Any] = {}
        for key, value in document.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: document}


def config_differences(documents: Sequence[Mapping[str, Any]]) -> List[str]:
    """``"<setting>: rank 0 = a, rank 1 = b"`` for each setting that is not the same everywhere."""
    flats = [_flatten(doc) for doc in documents]
    keys = sorted(set().union(*flats))
    lines = []
    for key in keys:
        values = [flat.get(key, "<absent>") for flat in flats]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r} = {v!r}" for r, v in enumerate(values))
            lines.append(f"{key.replace('exchange.', '', 1)}: {shown}")
    return lines
