"""Bytes per rank per step as the number of workers grows (no timing: byte accounting only).

    python -m hvdcomp.bench.bytes --numel 1000000 --sizes 2 4 8 --up sign

runs one round of the algorithm on the in-process simulator for each world size and pattern and
reads the exchange's byte counters (:mod:`hvdcomp.exchange`: bytes this rank *sends to other
ranks*). The two-phase sharded server sends about 2·(N−1)/N·|C(bucket)| per rank, constant in N;
the allgather pattern of GRACE/DGC sends (N−1)·|C(bucket)|, linear in N.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import torch

from ..algorithms import make_algorithm
from ..comm import simulate
from ..exchange import Exchange


def _one_round(comm, algorithm: str, up: str, down: Optional[str], pattern: str, numel: int,
               hyper: Dict) -> Dict[str, int]:
    exchange = Exchange(make_algorithm(algorithm, up=up, down=down, **hyper), comm, pattern=pattern)
    generator = torch.Generator().manual_seed(comm.rank)
    grad = torch.randn(numel, generator=generator)
    exchange.exchange("bucket", grad)
    exchange.end_round()
    return dict(exchange.last_round_bytes)


def bytes_per_rank(sizes: Sequence[int] = (2, 4, 8), numel: int = 1 << 20,
                   algorithm: str = "doublesqueeze", up: str = "sign", down: Optional[str] = None,
                   patterns: Sequence[str] = ("two_phase", "allgather"),
                   **hyper) -> List[Dict[str, object]]:
    """One row per (pattern, world size): mean over ranks of the bytes sent up, down and in
    total in one (non-sync) round, plus the largest total of any rank."""
    rows = []
    for pattern in patterns:
        for n in sizes:
            per_rank = simulate(n, _one_round, algorithm, up, down, pattern, numel, hyper)
            totals = [r["up"] + r["down"] for r in per_rank]
            rows.append({"pattern": pattern, "world_size": n, "numel": numel,
                         "algorithm": algorithm, "up_spec": up, "down_spec": down or up,
                         "up": round(sum(r["up"] for r in per_rank) / n),
                         "down": round(sum(r["down"] for r in per_rank) / n),
                         "total": round(sum(totals) / n), "max_total": max(totals)})
    return rows


def markdown(rows: List[Dict[str, object]]) -> str:
    """The rows as a markdown table (bytes per rank per step, mean over ranks)."""
    lines = ["| pattern | N | up (B) | down (B) | total (B) | max over ranks (B) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['world_size']} | {r['up']:,} | {r['down']:,} | "
                     f"{r['total']:,} | {r['max_total']:,} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 20, help="bucket size in elements")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8], help="world sizes")
    parser.add_argument("--algorithm", default="doublesqueeze")
    parser.add_argument("--up", default="sign", help="uplink compressor spec")
    parser.add_argument("--down", default=None, help="downlink compressor spec (default: up)")
    parser.add_argument("--patterns", nargs="+", default=["two_phase", "allgather"])
    args = parser.parse_args(argv)
    rows = bytes_per_rank(args.sizes, args.numel, args.algorithm, args.up, args.down,
                          args.patterns)
    print(markdown(rows))


if __name__ == "__main__":
    main()
