"""The algorithms written a second time, plainly: one server, dense tensors, no chunks, no bytes.

The sharded exchange (hvdcomp/exchange.py) splits every bucket into N chunks, packs payloads,
alltoalls and allgathers them, and keeps each chunk's server state on a different rank. The
oracle below does none of that: it holds every worker's gradient in one list, applies the
compressors to whole vectors, and keeps one server error. Agreement between the two is the test.

``compress_up`` / ``compress_down`` are functions x ↦ C(x) (what the receiver decodes). For
compressors that act per chunk in the exchange, pass :func:`per_chunk` (top-k per chunk) or a
compressor whose blocks never straddle chunks (blockwise sign), for which the whole-vector C
is the same function.

Also here: the scenario helpers that the simulator tests and the real-rank tests share.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

Compress = Callable[[torch.Tensor], torch.Tensor]


def mean(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(Σ_j x_j) · (1/n), summed in list order, float64. Multiplying by 1/n (not dividing by n)
    is how Horovod's Average scales; the exchange does the same, so the two agree to the last bit
    and a compressor that rounds (fp32 values in top-k payloads) cannot amplify a 1-ulp
    difference into a different rounding."""
    total = vectors[0].clone()
    for v in vectors[1:]:
        total = total + v
    return total * (1.0 / len(vectors))


def oracle(algorithm: str, grads: torch.Tensor, compress_up: Compress, compress_down: Compress,
           period: int = 32) -> torch.Tensor:
    """Updates ``u[t, i]`` of worker i at step t for ``grads[t, i]`` (shape steps × n × d).

    Update rules (research notes §1.2, §1.4):
      psgd:          u = C_d(mean_j C_u(g_j))
      memsgd:        p_i = g_i + e_i; e_i = p_i − C_u(p_i); u = mean_j C_u(p_j)
      doublesqueeze: as memsgd, then v = mean_j C_u(p_j) + e; u = C_d(v); e = v − C_d(v)
      liec:          r_i = g_i − C_u(g_i); v = mean_j C_u(g_j) + e; e = v − C_d(v);
                     u_i = C_d(v) + r_i;  every period-th step: u = mean_j g_j + e, e = 0
    """
    steps, n, d = grads.shape
    worker_error = [torch.zeros(d, dtype=grads.dtype) for _ in range(n)]
    server_error = torch.zeros(d, dtype=grads.dtype)
    updates = torch.empty_like(grads)
    for t in range(steps):
        g = [grads[t, i] for i in range(n)]
        if algorithm == "psgd":
            u = compress_down(mean([compress_up(gi) for gi in g]))
            updates[t] = u
        elif algorithm == "memsgd":
            p = [g[i] + worker_error[i] for i in range(n)]
            c = [compress_up(pi) for pi in p]
            worker_error = [p[i] - c[i] for i in range(n)]
            updates[t] = mean(c)
        elif algorithm == "doublesqueeze":
            p = [g[i] + worker_error[i] for i in range(n)]
            c = [compress_up(pi) for pi in p]
            worker_error = [p[i] - c[i] for i in range(n)]
            v = mean(c) + server_error
            cv = compress_down(v)
            server_error = v - cv
            updates[t] = cv
        elif algorithm == "liec":
            if (t + 1) % period == 0:
                updates[t] = mean(g) + server_error
                server_error = torch.zeros(d, dtype=grads.dtype)
                continue
            c = [compress_up(gi) for gi in g]
            r = [g[i] - c[i] for i in range(n)]
            v = mean(c) + server_error
            cv = compress_down(v)
            server_error = v - cv
            for i in range(n):
                updates[t, i] = cv + r[i]
        else:
            raise ValueError(f"oracle has no algorithm {algorithm!r}")
    return updates


def plain_chunks(d: int, n: int, alignment: int = 64) -> List[Tuple[int, int]]:
    """docs/design.md's chunking rule, written out: n chunks of ceil(d/n) rounded up to a
    multiple of ``alignment``, the last ones shorter or empty."""
    size = -(-d // n)
    size = -(-size // alignment) * alignment
    return [(min(j * size, d), min((j + 1) * size, d)) for j in range(n)]


def per_chunk(compress: Compress, bounds: Sequence[Tuple[int, int]]) -> Compress:
    """x ↦ concat_j C(x[chunk j]) (empty chunks stay empty)."""
    def apply(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([compress(x[a:b]) if b > a else x[a:b] for a, b in bounds])
    return apply


def decoded(compressor) -> Compress:
    """x ↦ C(x) for an hvdcomp compressor (what the receiver decodes)."""
    return lambda x: compressor.roundtrip(x.contiguous())[1]


# --- scenarios shared by the simulator and real-rank tests ---------------------------------------
def gradients(seed: int, steps: int, n: int, d: int, dyadic: bool = False) -> torch.Tensor:
    """float64 gradients, steps × n × d, the same on every rank for the same seed.

    ``dyadic``: integers in [−1024, 1024] divided by 64. Sums of up to 8 of them are multiples of
    1/64 below 2¹⁴ in magnitude, exactly representable in float64 (53-bit significand), and
    dividing by N = 2 or 4 is exact too; so an average is exact whatever order a collective
    sums in (ring, tree, rank order), and bit-for-bit comparisons are legitimate."""
    generator = torch.Generator().manual_seed(seed)
    if dyadic:
        return torch.randint(-1024, 1025, (steps, n, d), generator=generator).double() / 64
    return torch.randn(steps, n, d, generator=generator, dtype=torch.float64)


def run_exchange(comm, algorithm: str, grads: torch.Tensor, up: str = "none",
                 down: str = None, pattern: str = "two_phase", hyper: Dict = None,
                 buckets: int = 1, prepare: bool = True) -> Dict[str, object]:
    """Run ``steps`` rounds of ``algorithm`` on this rank (``comm.rank``) with ``grads[t, rank]``.

    The gradient is cut into ``buckets`` buckets of uneven sizes (exchanged under separate keys;
    started in an order that differs between ranks, finished in one order). Returns this rank's
    updates (steps × d), per-step snapshots of its worker and server errors (whole-bucket
    concatenations; server errors for the chunk this rank owns), and byte counters. Without
    ``prepare`` every bucket's configuration is checked lazily by its first ``start``. On
    engines that pair collectives by launch order (``comm.pairs_by_name`` False: torch ranks)
    every rank starts the buckets in one order."""
    from hvdcomp.algorithms import make_algorithm
    from hvdcomp.exchange import Exchange

    steps, _, d = grads.shape
    algo = make_algorithm(algorithm, up=up, down=down, **(hyper or {}))
    exchange = Exchange(algo, comm, pattern=pattern)
    cuts = [round(d * k / buckets) for k in range(buckets + 1)]
    # uneven buckets: shift inner cuts by a few elements
    cuts = [0] + [min(max(c + 3 * k, 1), d - 1) for k, c in enumerate(cuts[1:-1], 1)] + [d]
    keys = [f"b{k}" for k in range(buckets)]
    if prepare:
        exchange.prepare({key: (cuts[k + 1] - cuts[k], grads.dtype)
                          for k, key in enumerate(keys)})
    updates = torch.empty(steps, d, dtype=grads.dtype)
    worker_errors, server_errors, sync = [], [], []
    for t in range(steps):
        g = grads[t, comm.rank]
        sync.append(exchange.is_sync_step())
        order = list(range(buckets))
        if comm.rank % 2 and getattr(comm, "pairs_by_name", True):
            order.reverse()  # collectives pair by name, not by call order (not on torch ranks)
        handles = {k: exchange.start(keys[k], g[cuts[k]:cuts[k + 1]]) for k in order}
        for k in range(buckets):
            updates[t, cuts[k]:cuts[k + 1]] = exchange.finish(handles[k])
        exchange.end_round()
        worker_errors.append({key: state_of(algo, "worker_error", key) for key in keys})
        server_errors.append({key: state_of(algo, "server_error", key) for key in keys})
    return {"updates": updates, "worker_error": worker_errors, "server_error": server_errors,
            "sync": sync, "bytes_up": exchange.bytes_up, "bytes_down": exchange.bytes_down,
            "layouts": {key: exchange.layout(key) for key in keys}, "cuts": cuts}


def state_of(algo, attribute: str, key: str):
    value = getattr(algo, attribute, {}).get(key)
    return None if value is None else value.clone()
