"""Profile exchange rounds of one algorithm with sign on ResNet-18's gradient size (44.7 MB):
the round times of every rank, and rank 0's cProfile of five rounds (docs/benchmarks.md, "Where a
round's time goes").  Each round runs as the optimizer runs it: the gradient in the bucket's
buffer, which is also ``update_into``.  Run under a launcher, one thread per rank:

    mpirun -np 2 -x OMP_NUM_THREADS=1 python scripts/profile_round.py liec
    mpirun -np 2 -x OMP_NUM_THREADS=1 python scripts/profile_round.py liec:exact
    mpirun -np 2 -x OMP_NUM_THREADS=1 python scripts/profile_round.py memsgd

``liec:exact`` profiles LIEC-SGD's exact rounds instead (period 1), with the bucket's parameters
averaged as the optimizer does.
"""
import cProfile
import pstats
import sys
import time

import horovod.torch as hvd
import torch

from hvdcomp.algorithms import ALGORITHMS, make_algorithm
from hvdcomp.comm.horovod import HorovodCommunicator
from hvdcomp.exchange import Exchange

NUMEL = int(42.61 * 2 ** 20) // 4


def main(spec: str) -> None:
    algorithm, _, mode = spec.partition(":")
    exact = mode == "exact"                     # every round an exact one, nothing else
    hvd.init()
    comm = HorovodCommunicator()
    grad = torch.randn(NUMEL, generator=torch.Generator().manual_seed(comm.rank))
    options = {"period": 1} if exact else {}
    down = "sign" if ALGORITHMS[algorithm].compresses_downlink else None   # MEM-SGD: dense
    exchange = Exchange(make_algorithm(algorithm, up="sign", down=down, **options), comm)
    params = [grad.clone()] if exact else []    # the bucket's parameters, averaged in place
    exchange.prepare({"b": (NUMEL, torch.float32)})

    # as hvdcomp.DistributedOptimizer runs a round: the gradient in the bucket's buffer, which
    # is also update_into (the update is decoded over it); refilled before each round, untimed
    bucket = torch.empty(NUMEL)

    def exchange_once():
        bucket.copy_(grad)
        exchange.finish(exchange.start("b", bucket, params=params, update_into=bucket))
        exchange.end_round()

    def skip_other_rounds():
        while exchange.is_sync_step() != exact:    # LIEC's exact rounds, unless profiled
            exchange_once()

    def one_round():
        skip_other_rounds()
        exchange_once()

    for _ in range(3):
        one_round()
    times = []
    for _ in range(5):
        skip_other_rounds()
        bucket.copy_(grad)
        comm.barrier("profile.round")
        began = time.perf_counter()
        exchange.finish(exchange.start("b", bucket, params=params, update_into=bucket))
        times.append(time.perf_counter() - began)
        exchange.end_round()
    print(comm.rank, "round ms", sorted(round(1e3 * t, 1) for t in times), flush=True)
    profiler = cProfile.Profile() if comm.rank == 0 else None
    if profiler:
        profiler.enable()
    for _ in range(5):
        one_round()
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "liec")
