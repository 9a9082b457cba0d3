"""The rows of ``bench train`` that run inside Horovod ranks: ``horovod-idle`` (Horovod initialised,
no collective), ``horovod``/``horovod-fp16`` (Horovod's own ``DistributedOptimizer``) and hvdcomp's
``DistributedOptimizer``. One rank's raw record; see :mod:`hvdcomp.bench.train` for the timing."""
from __future__ import annotations

import time
from typing import Dict, List, Optional

from .train_worker import Row, loss_of, model_and_batch, sgd


class HorovodRunner:
    """One row's model, optimizer and fixed batch; :meth:`step` returns one timed row."""

    def __init__(self, spec: Dict[str, object], hvd):
        self.kind, self.hvd = spec["kind"], hvd
        self.model, self.inputs, self.labels = model_and_batch(spec, hvd.rank())
        base = sgd(self.model)
        named = list(self.model.named_parameters())
        if self.kind == "horovod-idle":
            self.optimizer = base
        elif self.kind in ("horovod", "horovod-fp16"):
            compression = hvd.Compression.fp16 if self.kind == "horovod-fp16" \
                else hvd.Compression.none
            self.optimizer = hvd.DistributedOptimizer(base, named_parameters=named,
                                                      compression=compression)
        else:
            import hvdcomp
            self.optimizer = hvdcomp.DistributedOptimizer(
                base, named_parameters=named, pattern=spec.get("pattern"),
                compression=hvdcomp.Compression.algorithm(spec["algorithm"], up=spec["up"]))
        self.gradient_numel = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def stats(self):
        return getattr(self.optimizer, "stats", None) if self.kind == "hvdcomp" else None

    @property
    def period(self) -> Optional[int]:
        return getattr(getattr(self.optimizer, "algorithm", None), "period", None)

    def bucket_bytes(self) -> Optional[int]:
        """The largest compressed bucket of hvdcomp's optimizer (bytes of fp32 gradient)."""
        reducer = getattr(self.optimizer, "_reducer", None)
        buckets = [b for b in getattr(reducer, "buckets", [])
                   if b.exchange is getattr(reducer, "exchange", None)]
        return max((4 * b.numel for b in buckets), default=None)

    def next_is_exact(self) -> bool:
        exchange = getattr(self.optimizer, "exchange", None) if self.kind == "hvdcomp" else None
        return bool(exchange is not None and exchange.is_sync_step())

    def jump_to_exact_round(self) -> None:
        """Advance the algorithm's round counter so that the next round is an exact one (LIEC's
        exact rounds depend on nothing but the counter)."""
        algorithm, period = self.optimizer.algorithm, self.period
        algorithm.step += (period - 1 - algorithm.step % period) % period

    def step(self) -> Row:
        stats = self.stats
        before = (stats.time_compress, stats.bytes_up, stats.bytes_down) if stats else (0.0, 0, 0)
        exact = self.next_is_exact()
        idle = self.kind == "horovod-idle"
        t0 = time.perf_counter()
        self.optimizer.zero_grad()
        loss_of(self.model, self.inputs, self.labels).backward()
        t1 = time.perf_counter()
        if not idle:
            self.optimizer.synchronize()
        t2 = time.perf_counter()
        if idle:
            self.optimizer.step()
        else:
            with self.optimizer.skip_synchronize():
                self.optimizer.step()
        t3 = time.perf_counter()
        compress = stats.time_compress - before[0] if stats else 0.0
        comm = t2 - t1
        update = t3 - t2
        if exact:   # LIEC's exact round averages the parameters inside step(): communication
            comm, update = comm + update, 0.0
        compute = (t1 - t0 - compress) + update
        up, down = self._bytes(stats, before)
        return [t3 - t0, compute, compress, comm, float(up), float(down)]

    def _bytes(self, stats, before):
        if stats:
            return stats.bytes_up - before[1], stats.bytes_down - before[2]
        if self.kind in ("horovod", "horovod-fp16"):
            from .comm import ring_model_bytes
            itemsize = 2 if self.kind == "horovod-fp16" else 4
            return ring_model_bytes(self.gradient_numel, itemsize, self.hvd.size(),
                                    self.hvd.rank())
        return 0, 0


def timed_steps(runner, warmup: int, steps: int):
    """Warm-up, timed steps, and (for a periodic algorithm whose exact round fell outside them)
    one exact round timed separately: (compressed rows, exact rows, period)."""
    for _ in range(warmup):
        runner.step()
    compressed: List[Row] = []
    exact: List[Row] = []
    for _ in range(steps):
        (exact if runner.next_is_exact() else compressed).append(runner.step())
    period = runner.period
    if period is not None and period > 1 and not exact:
        runner.jump_to_exact_round()
        runner.step()                     # warm-up: the first exact round pays one-time costs
        runner.jump_to_exact_round()
        exact.append(runner.step())
    if not compressed:   # period 1: every round exact
        compressed, exact = exact, []
    return compressed, exact, period


def run_horovod(spec: Dict[str, object]) -> Dict[str, object]:
    import horovod.torch as hvd

    from .train_worker import comm_modules

    hvd.init()
    try:
        runner = HorovodRunner(spec, hvd)
        compressed, exact, period = timed_steps(runner, int(spec["warmup"]), int(spec["steps"]))
        source = {"hvdcomp": "optimizer counters", "horovod-idle": "none"}.get(
            runner.kind, "ring model")
        record = {"compressed": compressed, "exact": exact, "period": period,
                  "bytes_source": source, "parameters": runner.gradient_numel,
                  "bucket_bytes": runner.bucket_bytes() if runner.kind == "hvdcomp" else None,
                  "comm_modules": comm_modules()}
        hvd.barrier()    # no rank shuts down while another still waits on a collective
    finally:
        hvd.shutdown()
    return record
