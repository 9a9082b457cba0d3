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

Rounds in which ``algorithm.is_sync_step()`` holds (LIEC-SGD every ``period`` rounds) are exact
(:mod:`hvdcomp.exchange_sync`): ``start`` launches a dense allreduce average of the gradient (in
place in ``update_into`` when given) and takes this rank's server state
(``algorithm.server_flush``, its chunk); ``finish`` averages the bucket's parameters in place
when they were given (``start(key, grad, params=...)``, as the optimizer does; one allreduce
each) and returns ``algorithm.sync_update(key, mean, flushed)``, each chunk computed by its
owner and broadcast in place. Parameters not passed to ``start`` are averaged by
:meth:`Exchange.average_parameters`.

The parts, one module each: the round kinds (:mod:`hvdcomp.exchange_rounds`, exact rounds in
:mod:`hvdcomp.exchange_sync`); what the exchange asks of compressors, chunking included
(:mod:`hvdcomp.exchange_codec`); the cross-rank configuration check
(:mod:`hvdcomp.exchange_config`); the byte ledger and its one ring-allreduce formula
(:mod:`hvdcomp.exchange_ledger`); the buffers reused across rounds
(:mod:`hvdcomp.exchange_buffers`).

Byte accounting (``bytes_up``, ``bytes_down``, ``bytes_by_phase``; cumulative, per rank): the
bytes of payload *this rank sends to other ranks*, as if every collective were point-to-point
sends; bytes a rank sends itself are not counted, nor are the collectives' own headers, nor the
one-time configuration check. Two-phase uplink: Σ_{j≠rank} |payload of chunk j|; downlink:
(N−1)·|server payload of this rank's chunk|. Allgather uplink: (N−1)·|payload|, downlink 0.
Allreduces (``"allreduce"`` pattern, sync rounds: phases ``sync_grad`` and ``sync_params``) are
counted as a ring
allreduce sends (:mod:`hvdcomp.exchange_ledger`); the real bytes depend on the MPI or NCCL
algorithm. The server state's broadcasts in a sync round (each owner sends its chunk to the
N−1 others, an allgather's bytes) are counted as downlink, and so is the allgather of the
chunks' L1 norms that ``sign`` needs on the downlink ((N−1)·8 bytes).

Chunking (:func:`chunk_bounds`): a bucket of d elements is cut into N chunks of
``ceil(d/N)`` elements rounded up to a multiple of ``alignment``; the last chunks may be shorter
or empty (an empty chunk sends 0 bytes, its compressor is never called). ``alignment`` defaults
to lcm(64, the compressors' declared ``Compressor.alignment``), so that bit-packed chunks are
whole bytes and blocks never straddle chunks: a blockwise compressor then gives the same result
sharded as on the whole bucket. A block larger than ceil(d/N) therefore concentrates a bucket on
few ranks (load imbalance, bytes no longer flat in N): keep blocks well below bucket size / N,
or pass ``alignment=64`` and accept that blocks restart at chunk boundaries.

Buffers (memory: a rank keeps its algorithm's state plus one bucket of scratch,
tests/test_memory_bound.py).  The worker's C(p_i) is decoded into one buffer the exchange keeps
per bucket across rounds (:class:`hvdcomp.exchange_buffers.ReusedBuffers`), or into the caller's
``update_into`` when the algorithm declares ``keeps_worker_sent = False``, and handed to
``worker_sent``: the algorithm may write over it until ``worker_update`` of the same bucket and
round, and copies what it keeps longer.  The two-phase server works in two chunk-sized regions
of the update it returns (the caller's ``update_into``, else fresh) until the downlink arrives.
Steps an algorithm declares (``Algorithm.worker_residual``, ``server_residual``,
``server_adds_mean_to``, ``worker_adds_gradient_to``) run fused with the compressor: error
feedback's x − C(x) written over x in the decoder's pass, LIEC-SGD's r_i kept in
``update_into``, the server's v = m + e and the worker's p_i = g_i + e_i in the decoder's and
the encoder's pass (:mod:`hvdcomp.exchange_rounds`; docs/design.md, "The fused residual").
``worker_message`` and ``server_message`` may return a tensor the algorithm owns and overwrite
it in ``worker_sent`` / ``server_sent``: payloads that view it are copied first.  The exchange
does not read the mean again after ``server_message``, nor the received C(v) after
``worker_update``: the steps may add into them in place.  Large fresh CPU tensors come from
``compressors._wire.allocate`` (numpy: transparent huge pages, fewer page faults).  The values
are those of the plain formulas, bit for bit; only the memory and the passes change.

Names: every collective is called ``<name_prefix>.<key>.<phase>`` (``name_prefix`` defaults to
``hvdcomp``), the same every round; ``start`` may be called in
any order across ranks (collectives pair by name, the configuration check of a bucket first seen
by ``start`` too), but ``finish`` must be called in the same
bucket order on every rank, because ``finish`` issues the downlink collective and waits for it.

Overlap of the downlink (the finish in two halves):

    for update in finish_in_order([(exchange, h) for h in handles]):   # pipelined finish
        ...                                                            # bucket by bucket

:meth:`Exchange.finish_server` waits for a bucket's uplink, runs the server steps and launches
the downlink allgather; :meth:`Exchange.finish_worker` waits for that downlink, decodes it and
runs ``worker_update``; ``finish`` is the two back to back.  :func:`finish_in_order` runs
bucket k+1's server half before bucket k's worker half, so bucket k's downlink is in flight
while bucket k+1's server decodes, averages and compresses (and ``sign``'s bucket-norm
allgather of k+1 runs), and bucket k+1's downlink travels while bucket k is decoded.  Only the
two-phase round has a downlink collective to overlap; the other kinds finish whole in
``finish_server``.  The values are bit for bit those of ``finish`` (tests/test_overlap.py);
``finish_server`` is then the call that must come in the same bucket order on every rank (it
launches the collectives; ``finish_worker`` only waits).  ``hvdcomp.DistributedOptimizer``
finishes its buckets this way; the DDP hook too (through the same reducer).
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from .algorithms.base import Algorithm
from .comm.base import Communicator
from .compressors import Compressor
from .exchange_buffers import ReusedBuffers, flat_target
from .exchange_codec import (BASE_ALIGNMENT, chunk_bounds, default_alignment,  # noqa: F401
                             summable_dtype)
from .exchange_config import (BucketSpec, ConfigMismatchError, bucket_spec,  # noqa: F401
                              config_differences, post_config, verify_config)
from .exchange_ledger import ByteLedger
from .exchange_rounds import (FINISHES, SPLIT_FINISHES, STARTS, ExchangeHandle,
                              start_two_phase)
from .exchange_sync import average_parameters, finish_sync, start_sync

PATTERNS = ("two_phase", "allgather", "allreduce")

__all__ = ["BASE_ALIGNMENT", "PATTERNS", "BucketSpec", "ConfigMismatchError", "Exchange",
           "ExchangeHandle", "chunk_bounds", "config_differences", "default_alignment",
           "finish_in_order", "summable_dtype"]


class Exchange:
    """Runs ``algorithm`` over ``comm`` with the collective ``pattern`` (see module docstring).

    Attributes ``bytes_up``, ``bytes_down`` (cumulative bytes this rank sent, see the module
    docstring), ``bytes_by_phase`` (the same split by phase) and ``last_round_bytes``
    (``{"up", "down"}`` of the last completed round) are read by the optimizer and benchmarks;
    they are the :class:`~hvdcomp.exchange_ledger.ByteLedger` ``ledger``'s.
    """

    #: first part of every collective's name; an owner that runs several exchanges over one
    #: communicator (each hvdcomp.DistributedOptimizer) sets its own, so names never collide
    name_prefix = "hvdcomp"

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
        self.ledger = ByteLedger(comm.size, comm.rank)
        self._buckets: Dict[str, Tuple[int, torch.dtype]] = {}   # checked across ranks
        self._checks = 0
        self._in_flight: Dict[str, ExchangeHandle] = {}
        self._done_this_round: set = set()
        #: per (bucket, role) buffers reused across rounds; not state
        self.buffers = ReusedBuffers()

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

    @property
    def bytes_up(self) -> int:
        return self.ledger.up

    @bytes_up.setter
    def bytes_up(self, value: int) -> None:     # a checkpoint's counters (optimizer load_slice)
        self.ledger.restore(up=value)

    @property
    def bytes_down(self) -> int:
        return self.ledger.down

    @bytes_down.setter
    def bytes_down(self, value: int) -> None:
        self.ledger.restore(down=value)

    @property
    def bytes_by_phase(self) -> Dict[str, int]:
        return self.ledger.by_phase

    @property
    def last_round_bytes(self) -> Dict[str, int]:
        return self.ledger.last_round

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
        verify_config(post_config(self.comm, self.config(), specs, name), self.size)
        self._buckets.update(specs)

    def _new_buckets(self, buckets: Mapping[str, BucketSpec]) -> Dict[str, Tuple[int, torch.dtype]]:
        specs = {str(key): bucket_spec(key, spec) for key, spec in buckets.items()}
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

    def start(self, key: str, grad: torch.Tensor, params: Sequence[torch.Tensor] = (),
              update_into: Optional[torch.Tensor] = None) -> ExchangeHandle:
        """Launch the exchange of bucket ``key`` with this rank's gradient ``grad`` (any shape;
        treated as flat). Non-blocking. The first time a key is seen without :meth:`prepare`, its
        configuration check is launched too and verified by :meth:`finish`.

        ``params``: the parameters the bucket holds the gradients of.  Used only in an exact
        round (LIEC-SGD): :meth:`finish` then averages them in place (one allreduce each), so
        the caller does not pass them to :meth:`average_parameters` (they must not change
        between start and finish).

        ``update_into``: a contiguous tensor of ``grad``'s size and dtype (``grad`` itself may
        be given: the algorithm steps do not read the gradient after ``start``) that the
        round writes the update into instead of a fresh tensor (every kind but a method's own
        collectives, PowerSGD's); the two-phase server also uses it as scratch and the exact
        round averages the gradient in it.  The caller leaves it alone until :meth:`finish`
        and uses the update it returns."""
        key = str(key)
        if key in self._in_flight or key in self._done_this_round:
            raise ValueError(f"bucket {key!r} was already exchanged in round {self.round}: call "
                             "exchange.end_round() once per optimizer step, after every finish()")
        if not grad.is_floating_point():
            raise ValueError(f"bucket {key!r}: gradients must be floating point, not {grad.dtype}")
        config_check = self._check_bucket(key, (grad.numel(), grad.dtype))
        flat = grad.detach().reshape(-1)
        target = None if update_into is None else flat_target(update_into, flat, key)
        if self.algorithm.is_sync_step():
            handle = start_sync(self, key, flat, params, target)
        else:
            # a method that runs its own collectives (PowerSGD) declares round_kind "owned"
            start = STARTS[getattr(self.algorithm, "round_kind", None) or self.pattern]
            handle = (start_two_phase(self, key, flat, target) if start is start_two_phase
                      else start(self, key, flat))
        handle.shape = grad.shape
        if target is not None:
            handle.context["update_into"] = target
        if config_check is not None:
            handle.pending["config"] = config_check
        self._in_flight[key] = handle
        return handle

    def _check_bucket(self, key: str, spec: Tuple[int, torch.dtype]):
        """The configuration check of a bucket first seen now (launched, not awaited: hooks may
        start buckets in different orders on different ranks, and a blocking check here would
        deadlock them; finish() verifies it first), or None for a known bucket."""
        if key not in self._buckets:
            check = post_config(self.comm, self.config(), {key: spec},
                                f"hvdcomp.config.bucket.{key}")
            self._buckets[key] = spec
            return check
        if self._buckets[key] != spec:
            raise ValueError(f"bucket {key!r} holds {self._buckets[key][0]} elements of "
                             f"{self._buckets[key][1]}, got {spec[0]} of {spec[1]}: a bucket's "
                             "size and dtype are fixed at its first exchange")
        return None

    def finish(self, handle: ExchangeHandle) -> torch.Tensor:
        """Wait for ``handle``'s collectives, run the server and worker steps; returns the update
        direction ``u_i`` for this bucket, shaped like the gradient given to :meth:`start`.
        The same as ``finish_worker(finish_server(handle))``."""
        return self.finish_worker(self.finish_server(handle))

    def finish_server(self, handle: ExchangeHandle) -> ExchangeHandle:
        """The first half of :meth:`finish`: wait for the uplink, run the server steps and
        launch the downlink without waiting for it; returns ``handle``, now "served", for
        :meth:`finish_worker`.  Only the two-phase round is split this way; the other kinds
        (no downlink collective, or exact and owned rounds) finish here whole, and
        :meth:`finish_worker` hands their update back.  The collectives launched here (the
        downlink, ``sign``'s bucket norm, an owned round's) make this the call that every rank
        must make in the same bucket order."""
        self._check_in_flight(handle)
        if handle.served:
            raise ValueError(f"{handle!r}: finish_server() was called twice")
        if "config" in handle.pending:
            verify_config(handle.pending.pop("config"), self.size)
        if handle.kind in SPLIT_FINISHES:
            SPLIT_FINISHES[handle.kind][0](self, handle)
        else:
            finish = finish_sync if handle.kind == "sync" else FINISHES[handle.kind]
            handle.context["update"] = finish(self, handle)
        handle.served = True
        return handle

    def finish_worker(self, handle: ExchangeHandle) -> torch.Tensor:
        """The second half of :meth:`finish`, after :meth:`finish_server`: wait for the
        downlink, decode it and run ``worker_update``; returns the update as :meth:`finish`.
        Launches no collective, so ranks may call it at any point after ``finish_server``
        (:func:`finish_in_order` calls it after the next bucket's ``finish_server``)."""
        self._check_in_flight(handle)
        if not handle.served:
            raise ValueError(f"{handle!r}: call finish_server() before finish_worker()")
        if handle.kind in SPLIT_FINISHES:
            update = SPLIT_FINISHES[handle.kind][1](self, handle)
        else:
            update = handle.context.pop("update")
        handle.finished = True
        del self._in_flight[handle.key]
        self._done_this_round.add(handle.key)
        return update.reshape(handle.shape)

    def _check_in_flight(self, handle: ExchangeHandle) -> None:
        if handle.finished or self._in_flight.get(handle.key) is not handle:
            raise ValueError(f"{handle!r} is not in flight on this exchange (finished twice, or "
                             "started on another exchange)")

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
        self.ledger.close_round()

    def average_parameters(self, tensors: Iterable[torch.Tensor]) -> None:
        """Replace every tensor, in place, by its exact average over ranks (dense allreduce). The
        optimizer calls it in sync rounds (LIEC-SGD), before applying the update; every rank
        must pass the same tensors in the same order."""
        average_parameters(self, tensors)

    def state_dict(self) -> Dict[str, Any]:
        """The byte counters and the algorithm's state (checkpoints; resuming keeps cumulative
        byte counts)."""
        return {**self.ledger.state_dict(), "algorithm": self.algorithm.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.algorithm.load_state_dict(state["algorithm"])
        self.ledger.load_state_dict(state)

    # --- what the round kinds read -------------------------------------------------------------
    def uplink(self, key: str) -> Compressor:
        """The uplink compressor of bucket ``key``: ``algorithm.uplink_for(key)`` (DGC per
        layer: one compressor per bucket layout)."""
        return self.algorithm.uplink_for(key)

    def name(self, key: str, phase: str) -> str:
        """The collective's name: the same every round (Horovod's response cache keeps one
        entry per collective and skips the negotiation; a round number here made every step's
        names new, evicting the cache).  Unique among collectives in flight, since a round
        finishes every bucket before the next starts (end_round refuses otherwise)."""
        return f"{self.name_prefix}.{key}.{phase}"

    def seed_for(self, key: str, direction: str, chunk: int) -> int:
        """Shared by every rank for the same round, bucket, direction and chunk (random-k draws
        the same indices everywhere); crc32, not hash(), which differs between processes."""
        text = f"{self.seed}:{key}:{self.round}:{direction}:{chunk}"
        return zlib.crc32(text.encode()) & 0x7FFFFFFF


def finish_in_order(started: Iterable[Tuple[Exchange, ExchangeHandle]]) -> Iterator[torch.Tensor]:
    """Finish every ``(exchange, handle)`` of ``started``, in that order, pipelined: yields each
    bucket's update (as :meth:`Exchange.finish` returns it) in order, but runs the server half
    of bucket k+1 (its uplink waited for, server steps, downlink *launched*) before the worker
    half of bucket k (wait for k's downlink, decode, ``worker_update``), so that bucket k's
    downlink travels while bucket k+1's server works, and k+1's while k is decoded.

    Every value is the one :meth:`Exchange.finish` gives bucket by bucket, bit for bit: a
    bucket's steps touch only its own state and tensors, and only the order across buckets
    changes.  The collectives are launched in the order of ``started`` on every rank (what
    engines that pair by launch order need).  Without ``update_into`` (fresh updates) it holds
    one bucket's update more than bucket-by-bucket finishing while it runs (bucket k's, waiting
    for its downlink)."""
    previous: Optional[Tuple[Exchange, ExchangeHandle]] = None
    for exchange, handle in started:
        exchange.finish_server(handle)
        if previous is not None:
            yield previous[0].finish_worker(previous[1])
        previous = (exchange, handle)
    if previous is not None:
        yield previous[0].finish_worker(previous[1])
