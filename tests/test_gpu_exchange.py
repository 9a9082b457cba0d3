"""The exchange on a CUDA device, with simulated ranks (marker ``gpu``; skipped without one;
scripts/gpu-check.sh runs them): every algorithm's rounds give the CPU's updates (to float64
rounding with top-k, to fp32 rounding with sign), the sharded rounds give the float64
single-server oracle's, and a round -- worker steps, both collectives, server steps, decoding --
never makes the host wait for the device.

Why the last matters: the exchange runs while backward still queues kernels; one host
synchronisation in a round (``.item()``, ``torch.equal``, ``nonzero``, a blocking copy) stalls
the Python thread until the GPU has drained, so nothing overlaps. Torch's sync debug mode at
"error" turns each such wait into an exception (:class:`gpu_support.SyncFreeRegion`).
"""
from __future__ import annotations

import pytest
import torch

from hvdcomp.algorithms import ALGORITHMS, make_algorithm
from hvdcomp.comm import simulate
from hvdcomp.compressors import from_spec
from hvdcomp.exchange import Exchange

from gpu_support import (GPU_MARKS, SyncFreeRegion, deferred_finite_check, finite_check,
                         first_difference)
from oracle import decoded, gradients, oracle, per_chunk, plain_chunks, run_exchange

pytestmark = GPU_MARKS

RANKS = 2
D = 3000
#: hyperparameters that make a short run reach an algorithm's special rounds (LIEC's exact round
#: and CSER's reset every 2nd round), or switch off DGC's warm-up (no epochs here)
PERIODIC = {"liec": {"period": 2}, "cser": {"period": 2}, "dgc": {"warmup_epochs": 0}}


def build(name: str, up: str, down, rank: int, **extra):
    """``make_algorithm`` with what ``name`` needs on rank ``rank``; ``down`` only for an
    algorithm that compresses its downlink (the others refuse one)."""
    hyper = dict(PERIODIC.get(name, {}), **extra)
    if name in ("ef21w", "ef21wpp"):
        hyper.update(smoothness=[1.0, 2.0][:RANKS], rank=rank)
    if name in ("ef21pp", "ef21wpp"):
        hyper.update(rank=rank, seed=3)
    if not ALGORITHMS[name].compresses_downlink:
        down = None
    return make_algorithm(name, up=up, down=down, **hyper)


def build_or_skip(name: str, up: str, down, **extra):
    try:
        build(name, up, down, 0, **extra)
    except ValueError as exc:   # e.g. an algorithm that refuses this compressor
        pytest.skip(f"{name} with up={up!r}: {exc}")


def rounds(comm, name, up, down, grads, device, pattern="two_phase", checked=(), region=None,
           extra=None):
    """``grads.shape[0]`` rounds of ``name`` on this simulated rank, on ``device``; the rounds
    in ``checked`` run inside ``region`` (a :class:`SyncFreeRegion`). Returns the updates on the
    CPU, one row per round."""
    algo = build(name, up, down, comm.rank, **(extra or {}))
    exchange = Exchange(algo, comm, pattern=pattern)
    exchange.prepare({"b": (grads.shape[-1], grads.dtype)})
    mine = grads[:, comm.rank].to(device)
    updates = []
    for t in range(grads.shape[0]):
        if t in checked:
            with region(comm.rank):
                update = exchange.exchange("b", mine[t])
                exchange.end_round()
        else:
            update = exchange.exchange("b", mine[t])
            exchange.end_round()
        updates.append(update.detach().to("cpu", copy=True))
    return torch.stack(updates)


def compare(name, on_gpu, on_cpu, rtol, atol, flips=0.0):
    """Every rank's updates close to the CPU's; ``flips``: the fraction of elements allowed to
    differ more (sign compressors: a scale one ulp apart moves the error-feedback residuals by as
    much, which turns the sign of the few coordinates within that distance of 0; a flipped sign
    differs by twice the scale there and nowhere else)."""
    for rank in range(RANKS):
        far = ~torch.isclose(on_gpu[rank], on_cpu[rank], rtol=rtol, atol=atol)
        allowed = int(flips * far.numel())
        assert int(far.sum()) <= allowed, (
            f"{name}, rank {rank}: {int(far.sum())} of {far.numel()} updates differ from the "
            f"CPU's by more than rtol={rtol}, atol={atol} (at most {allowed} may); first: "
            f"{first_difference(on_gpu[rank][far], on_cpu[rank][far])}")


# --- the same updates as on the CPU ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@deferred_finite_check()
def test_every_algorithm_updates_as_on_the_cpu_with_top_k(name):
    """Top-k both ways in float64: selections and elementwise arithmetic, sums in rank order. A
    GPU may fuse a multiply-add that the CPU rounds twice (or the reverse), so the bound is
    float64 rounding (1e-12), not the last bit; anything the round gets wrong (a chunk, an
    index, a missing error term) is larger by many orders."""
    up, down = "topk:ratio=0.1", "topk:ratio=0.2"
    build_or_skip(name, up, down)
    grads = gradients(seed=21, steps=4, n=RANKS, d=D)
    on_gpu = simulate(RANKS, rounds, name, up, down, grads, "cuda")
    on_cpu = simulate(RANKS, rounds, name, up, down, grads, "cpu")
    compare(name, on_gpu, on_cpu, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@deferred_finite_check()
def test_every_algorithm_updates_as_on_the_cpu_with_sign(name):
    """Sign both ways (fp32): the scale is a float sum the GPU adds in another order, so equal
    to rounding rather than bit for bit, up to the rare coordinate whose sign that turns."""
    up = "dgc:ratio=0.05" if name == "dgc" else "sign"
    build_or_skip(name, up, "sign")
    grads = gradients(seed=22, steps=4, n=RANKS, d=D).float()
    on_gpu = simulate(RANKS, rounds, name, up, "sign", grads, "cuda")
    on_cpu = simulate(RANKS, rounds, name, up, "sign", grads, "cpu")
    compare(name, on_gpu, on_cpu, rtol=1e-5, atol=1e-6, flips=0.01)


@deferred_finite_check()
def test_dgc_local_clipping_on_the_gpu_matches_the_cpu():
    """The clip scale stays on the device (no ``.item()``); the norm is a float sum, so equal to
    rounding. Thresholds 0.5 and 1e6: clipped, and left alone."""
    grads = gradients(seed=23, steps=3, n=RANKS, d=D).float()
    for clip_norm in (0.5, 1e6):
        extra = {"clip_norm": clip_norm, "world_size": RANKS}
        args = ("dgc", "topk:ratio=0.1", None, grads)
        on_gpu = simulate(RANKS, rounds, *args, "cuda", extra=extra)
        on_cpu = simulate(RANKS, rounds, *args, "cpu", extra=extra)
        compare(f"dgc clip_norm={clip_norm}", on_gpu, on_cpu, rtol=1e-5, atol=1e-6, flips=0.01)


# --- the float64 oracle ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["psgd", "memsgd", "doublesqueeze", "liec"])
@deferred_finite_check()
def test_sharded_rounds_on_the_gpu_match_the_single_server_oracle(name):
    """tests/oracle.py, written without chunks or payloads, on the CPU in float64."""
    n, d, up, down = 3, 1000, "topk:ratio=0.1", "topk:ratio=0.2"
    grads = gradients(seed=11, steps=5, n=n, d=d)
    dense_down = name == "memsgd"
    results = simulate(n, run_exchange, name, grads.cuda(), up, None if dense_down else down,
                       "two_phase", {"period": 3} if name == "liec" else {}, 1)
    chunks = plain_chunks(d, n)
    c_up = per_chunk(decoded(from_spec(up)), chunks)
    c_down = (lambda x: x) if dense_down else per_chunk(decoded(from_spec(down)), chunks)
    expected = oracle(name, grads, c_up, c_down, period=3)
    for rank in range(n):
        torch.testing.assert_close(results[rank]["updates"], expected[:, rank], rtol=1e-12,
                                   atol=1e-12)


# --- no host synchronisation in a round -----------------------------------------------------------
CHECKED_ROUNDS = (1, 2)   # after a first round (buffers, kernels); LIEC's and CSER's special one


def _sync_free(name, up, down, pattern="two_phase", dtype=torch.float32, extra=None):
    build_or_skip(name, up, down, **(extra or {}))
    grads = gradients(seed=31, steps=3, n=RANKS, d=D).to(dtype)
    region = SyncFreeRegion(RANKS)
    simulate(RANKS, rounds, name, up, down, grads, "cuda", pattern, CHECKED_ROUNDS, region,
             extra)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("up", ["sign", "topk:ratio=0.1"])
@deferred_finite_check()
def test_a_round_never_waits_for_the_device(name, up):
    down = "sign" if up == "sign" else "topk:ratio=0.2"
    _sync_free(name, "dgc:ratio=0.05" if name == "dgc" and up == "sign" else up, down)


@pytest.mark.parametrize("name", ["psgd", "liec", "doublesqueeze", "ef21", "dgc"])
@finite_check("auto")
def test_a_round_in_the_default_finite_check_mode_never_waits(name):
    """The default mode ("auto") polls the device's count of non-finite input through a pinned
    copy and an event: it must not wait either."""
    _sync_free(name, "dgc:ratio=0.05" if name == "dgc" else "sign", "sign")


@pytest.mark.parametrize("pattern,up", [("allgather", "sign"), ("allgather", "topk:ratio=0.1"),
                                        ("allreduce", "none"), ("allreduce", "fp16"),
                                        ("allreduce", "randomk:ratio=0.1")])
@deferred_finite_check()
def test_the_other_patterns_never_wait_for_the_device(pattern, up):
    _sync_free("psgd", up, None, pattern=pattern)


@pytest.mark.parametrize("extra", [{}, {"clip_norm": 0.5, "world_size": RANKS}],
                         ids=["plain", "clipped"])
@deferred_finite_check()
def test_dgc_as_the_paper_runs_it_never_waits_for_the_device(extra):
    """Its sampled top-k, the allgather pattern, momentum correction and masking."""
    _sync_free("dgc", "dgc:ratio=0.01", None, pattern="allgather", extra=extra)
