"""The exchange, the algorithms and the simulator, checked against plain float64 math and the
single-server oracle (tests/oracle.py). Real Horovod ranks: tests/test_exchange_ranks.py."""
from __future__ import annotations

import pytest
import torch

from hvdcomp.algorithms import ALGORITHMS, make_algorithm
from hvdcomp.comm import WorkerFailed, simulate
from hvdcomp.compressors import from_spec
from hvdcomp.exchange import ConfigMismatchError, Exchange, chunk_bounds

from oracle import decoded, gradients, mean, oracle, per_chunk, plain_chunks, run_exchange

ALGORITHM_NAMES = ["psgd", "memsgd", "doublesqueeze", "liec"]
PATTERNS = ["two_phase", "allgather", "allreduce"]


def compressor_or_skip(spec: str):
    try:
        return from_spec(spec)
    except ValueError as exc:  # the compressor module is not written yet
        pytest.skip(str(exc))


# --- the simulator -----------------------------------------------------------------------------
def _collectives(comm):
    r, n = comm.rank, comm.size
    x = torch.arange(4, dtype=torch.float64) + 10 * r
    # alltoall: rank r sends r+1 elements (value 100 r + j) to rank j
    sent = torch.cat([torch.full((r + 1,), 100.0 * r + j) for j in range(n)])
    return {
        "sum": comm.allreduce(x, "s", op="sum"),
        "average": comm.allreduce(x, "a"),
        "gather": comm.allgather(torch.full((r + 1,), float(r)), "g"),
        "alltoall": comm.alltoall(sent, [r + 1] * n, "t"),
        "broadcast": comm.broadcast(x, 2, "b"),
    }


def test_simulator_collectives_match_their_definitions():
    n = 3
    results = simulate(n, _collectives)
    xs = [torch.arange(4, dtype=torch.float64) + 10 * r for r in range(n)]
    for rank, got in enumerate(results):
        assert torch.equal(got["sum"], xs[0] + xs[1] + xs[2])
        assert torch.equal(got["average"], (xs[0] + xs[1] + xs[2]) * (1 / 3))
        assert got["gather"].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 2.0]
        received, splits = got["alltoall"]
        assert splits == [1, 2, 3]
        assert received.tolist() == [100.0 * src + rank for src in range(n) for _ in range(src + 1)]
        assert torch.equal(got["broadcast"], xs[2])


def _one_worker_raises(comm):
    if comm.rank == 1:
        raise KeyError("worker 1 broke")
    comm.allreduce(torch.ones(2), "never-completes")


def test_simulator_failure_reaches_every_worker_without_hanging():
    with pytest.raises(KeyError, match="worker 1 broke"):
        simulate(4, _one_worker_raises, timeout=30)


def _others_see_failure(comm):
    if comm.rank == 0:
        raise RuntimeError("boom")
    try:
        comm.allreduce(torch.ones(2), "x")
    except WorkerFailed as exc:
        return str(exc)


def test_simulator_waiting_workers_raise_worker_failed():
    # simulate re-raises the first failure; the others' WorkerFailed is what they saw
    with pytest.raises(RuntimeError, match="boom"):
        simulate(3, _others_see_failure, timeout=30)


def _rank0_skips_collective(comm):
    if comm.rank != 0:
        comm.allgather(torch.ones(1), "only-some")


def test_simulator_unmatched_collective_raises():
    with pytest.raises(WorkerFailed, match="returned without posting"):
        simulate(2, _rank0_skips_collective, timeout=30)


def _mismatched_shapes(comm):
    try:
        comm.allreduce(torch.ones(2 + comm.rank), "shapes")
    except ValueError as exc:
        return str(exc)


def test_simulator_mismatched_shapes_same_error_everywhere():
    messages = simulate(3, _mismatched_shapes, timeout=30)
    assert messages[0] and len(set(messages)) == 1 and "different shapes" in messages[0]


# --- chunking ------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [0, 1, 63, 64, 65, 100, 1000, 4099])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_chunks_tile_the_bucket_and_are_aligned(d, n):
    bounds = chunk_bounds(d, n, 64)
    assert bounds == plain_chunks(d, n, 64)
    assert len(bounds) == n and bounds[0][0] == 0 and bounds[-1][1] == d
    for (a, b), (c, _) in zip(bounds, bounds[1:]):
        assert b == c  # contiguous
    lengths = [b - a for a, b in bounds]
    nonempty = [length for length in lengths if length]
    assert all(length % 64 == 0 for length in nonempty[:-1])
    assert max(lengths) <= -(-(-(-d // n)) // 64) * 64


# --- exact average with the identity compressor ---------------------------------------------------
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
@pytest.mark.parametrize("n,d", [(3, 1000), (4, 130), (4, 5)])
def test_identity_compressor_gives_exact_average(algorithm, pattern, n, d):
    # dyadic values: every average is exact whatever the summation order (see oracle.gradients)
    grads = gradients(seed=n * d, steps=4, n=n, d=d, dyadic=True)
    hyper = {"period": 3} if algorithm == "liec" else {}  # round 2 is an exact sync round
    results = simulate(n, run_exchange, algorithm, grads, "none", "none", pattern, hyper, 2)
    for t in range(grads.shape[0]):
        # the sum is exact (dyadic values); the average is scaled as Horovod's Average scales,
        # sum · (1/N), which is exact for N = 2, 4 and one rounding for N = 3
        exact = grads[t].sum(0) * (1.0 / n)
        for rank in range(n):
            assert torch.equal(results[rank]["updates"][t], exact), (t, rank)
    if algorithm == "liec":
        assert results[0]["sync"] == [False, False, True, False]


# --- error conservation --------------------------------------------------------------------------
def _full_server_error(results, t, key, layout, d):
    """Concatenate each rank's chunk of the server error for bucket ``key``, zeros if absent."""
    parts = []
    for rank, (a, b) in enumerate(layout):
        chunk = results[rank]["server_error"][t][key]
        parts.append(torch.zeros(b - a, dtype=torch.float64) if chunk is None else chunk)
    return torch.cat(parts)


def _check_conservation(algorithm, up, down, n=3, d=700, steps=6, pattern="two_phase"):
    """Σ applied + new errors = Σ input + old errors, in float64 (to rounding):
    mean_i u_i + mean_i e_i' + e_s' = mean_i g_i + mean_i e_i + e_s."""
    grads = gradients(seed=7, steps=steps, n=n, d=d)
    hyper = {"period": 4} if algorithm == "liec" else {}
    if not ALGORITHMS[algorithm].compresses_downlink:
        down = None   # MEM-SGD's downlink is dense; a compressor for it would be refused
    results = simulate(n, run_exchange, algorithm, grads, up, down, pattern, hyper, 1)
    layout = results[0]["layouts"]["b0"]
    if pattern != "two_phase":  # replicated server: every rank holds the whole server error
        for t in range(steps):
            for r in range(1, n):
                e0, er = results[0]["server_error"][t]["b0"], results[r]["server_error"][t]["b0"]
                assert (e0 is None and er is None) or torch.equal(e0, er)
                results[r]["server_error"][t]["b0"] = None  # count it once
        layout = [(0, d)] + [(d, d)] * (n - 1)

    def errors(t):
        if t < 0:
            return torch.zeros(d, dtype=torch.float64)
        worker = [results[r]["worker_error"][t]["b0"] for r in range(n)]
        total = torch.zeros(d, dtype=torch.float64)
        if worker[0] is not None:
            total = total + mean(worker)
        return total + _full_server_error(results, t, "b0", layout, d)

    for t in range(steps):
        applied = mean([results[r]["updates"][t] for r in range(n)])
        lhs = applied + errors(t)
        rhs = mean([grads[t, i] for i in range(n)]) + errors(t - 1)
        torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-12)
    return errors


@pytest.mark.parametrize("up,down", [("sign", "sign"), ("blocksign:block=64", "topk:ratio=0.1"),
                                     ("topk:ratio=0.05", "blocksign:block=64")])
@pytest.mark.parametrize("algorithm", ["memsgd", "doublesqueeze", "liec"])
def test_error_conservation(algorithm, up, down):
    compressor_or_skip(up), compressor_or_skip(down)
    errors = _check_conservation(algorithm, up, down)
    # the errors are not trivially zero: compression did lose something
    assert errors(4).abs().max() > 1e-3


def _all_compressors():
    from hvdcomp.compressors import REGISTRY
    from_spec("none")  # loads the built-in compressor modules
    return sorted(REGISTRY)


@pytest.mark.parametrize("compressor", _all_compressors())
@pytest.mark.parametrize("algorithm", ["memsgd", "doublesqueeze", "liec"])
def test_any_compressor_plugs_into_any_algorithm(algorithm, compressor):
    """Every registered compressor (default parameters), both directions, conserves error.
    QSGD needs rescale=true under error feedback (algorithms refuse it otherwise, issue 14)."""
    spec = "qsgd:rescale=true" if compressor == "qsgd" else compressor
    _check_conservation(algorithm, spec, spec, n=3, d=300, steps=4)


@pytest.mark.parametrize("algorithm", ["doublesqueeze", "liec"])
def test_error_conservation_allgather_pattern(algorithm):
    _check_conservation(algorithm, "sign", "sign", pattern="allgather")


def test_psgd_conserves_nothing_but_is_exact_without_compression():
    # P-SGD keeps no error, so conservation is exactness of the average (identity compressor)
    grads = gradients(seed=3, steps=2, n=2, d=50, dyadic=True)
    results = simulate(2, run_exchange, "psgd", grads)
    for t in range(2):
        assert torch.equal(results[1]["updates"][t], (grads[t, 0] + grads[t, 1]) / 2)


# --- LIEC-SGD's virtual average -------------------------------------------------------------------
def _liec_training(comm, up, steps, period, lr):
    """Least squares per worker, f_i(x) = ½‖A_i x − b_i‖², x_i updated with LIEC's direction."""
    generator = torch.Generator().manual_seed(100 + comm.rank)
    d = 257
    a = torch.randn(d, d, generator=generator, dtype=torch.float64) / d ** 0.5
    b = torch.randn(d, generator=generator, dtype=torch.float64)
    x = torch.linspace(-1, 1, d, dtype=torch.float64)  # same start on every worker
    algo = make_algorithm("liec", up=up, down=up, period=period)
    exchange = Exchange(algo, comm)
    trace = []
    for _ in range(steps):
        g = a.T @ (a @ x - b)
        sync = exchange.is_sync_step()
        if sync:
            exchange.average_parameters([x])
        x_before = x.clone()
        u = exchange.exchange("params", g)
        x = x - lr * u
        exchange.end_round()
        error = algo.server_error.get("params")
        trace.append({"x": x_before, "g": g, "sync": sync,
                      "e": None if error is None else error.clone()})
    return {"trace": trace, "x_final": x, "layout": exchange.layout("params")}


@pytest.mark.parametrize("up", ["sign", "blocksign:block=64"])
def test_liec_virtual_average_identity(up):
    """x̄⁺ = x̄ − η(ḡ + eᵗ − eᵗ⁺¹) (research notes §1.2), step after step, syncs included."""
    compressor_or_skip(up)
    n, steps, period, lr = 4, 30, 8, 0.05
    results = simulate(n, _liec_training, up, steps, period, lr)
    layout = results[0]["layout"]

    def server_error(t):  # e after round t (t = -1: before the first round)
        if t < 0:
            return torch.zeros(257, dtype=torch.float64)
        parts = []
        for rank, (a, b) in enumerate(layout):
            e = results[rank]["trace"][t]["e"]
            parts.append(torch.zeros(b - a, dtype=torch.float64) if e is None else e)
        return torch.cat(parts)

    for t in range(steps):
        x_bar = mean([results[r]["trace"][t]["x"] for r in range(n)])
        g_bar = mean([results[r]["trace"][t]["g"] for r in range(n)])
        after = (mean([results[r]["trace"][t + 1]["x"] for r in range(n)]) if t + 1 < steps
                 else mean([results[r]["x_final"] for r in range(n)]))
        expected = x_bar - lr * (g_bar + server_error(t - 1) - server_error(t))
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-12)
    # sync rounds happened and the workers' models drifted apart in between
    assert [results[0]["trace"][t]["sync"] for t in range(steps)].count(True) == steps // period
    assert not torch.equal(results[0]["x_final"], results[1]["x_final"])


# --- the oracle -----------------------------------------------------------------------------------
ORACLE_CASES = [("none", "none"), ("blocksign:block=64", "blocksign:block=64"),
                ("topk:ratio=0.1", "topk:ratio=0.2"), ("blocksign:block=32", "topk:ratio=0.1")]


def oracle_compressor(spec: str, d: int, n: int):
    """C as the oracle applies it: blockwise sign on the whole vector (its blocks never straddle
    chunks, so sharding cannot change it), top-k on each chunk of docs/design.md's rule."""
    compressor = compressor_or_skip(spec)
    if spec.startswith("topk"):
        return per_chunk(decoded(compressor), plain_chunks(d, n))
    return decoded(compressor)


@pytest.mark.parametrize("up,down", ORACLE_CASES)
@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
@pytest.mark.parametrize("n,d", [(3, 1000), (4, 200)])
def test_sharded_exchange_matches_single_server_oracle(algorithm, up, down, n, d):
    grads = gradients(seed=11, steps=5, n=n, d=d)
    hyper = {"period": 3} if algorithm == "liec" else {}
    dense_down = algorithm == "memsgd"   # MEM-SGD's downlink is dense (a compressor is refused)
    results = simulate(n, run_exchange, algorithm, grads, up, None if dense_down else down,
                       "two_phase", hyper, 1)
    c_up, c_down = oracle_compressor(up, d, n), oracle_compressor(down, d, n)
    if dense_down:
        c_down = lambda x: x  # noqa: E731
    expected = oracle(algorithm, grads, c_up, c_down, period=3)
    for rank in range(n):
        torch.testing.assert_close(results[rank]["updates"], expected[:, rank], rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("algorithm", ["doublesqueeze", "liec", "memsgd"])
def test_allgather_pattern_matches_oracle_without_downlink_compression(algorithm):
    n, d = 3, 300
    grads = gradients(seed=5, steps=4, n=n, d=d)
    up = "blocksign:block=64"
    c_up = oracle_compressor(up, d, n)
    down = None if algorithm == "memsgd" else up   # MEM-SGD refuses a downlink compressor
    results = simulate(n, run_exchange, algorithm, grads, up, down, "allgather",
                       {"period": 3} if algorithm == "liec" else {}, 1)
    expected = oracle(algorithm, grads, c_up, lambda x: x, period=3)
    for rank in range(n):
        torch.testing.assert_close(results[rank]["updates"], expected[:, rank], rtol=1e-12,
                                   atol=1e-12)


# --- byte accounting ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4, 8])
def test_bytes_follow_the_documented_convention(n):
    sign = compressor_or_skip("sign")
    d = 1000
    grads = gradients(seed=1, steps=1, n=n, d=d)
    two_phase = simulate(n, run_exchange, "doublesqueeze", grads, "sign", "sign", "two_phase", {},
                         1)
    allgather = simulate(n, run_exchange, "doublesqueeze", grads, "sign", "sign", "allgather", {},
                         1)
    bounds = plain_chunks(d, n)
    size = [sign.payload_nbytes(b - a) if b > a else 0 for a, b in bounds]
    for rank in range(n):
        assert two_phase[rank]["bytes_up"] == sum(size) - size[rank]
        # plus sign's allgather of the chunks' L1 norms (one float64 per rank: one scale per bucket)
        assert two_phase[rank]["bytes_down"] == (n - 1) * size[rank] + (n - 1) * 8
        assert allgather[rank]["bytes_up"] == (n - 1) * sign.payload_nbytes(d)
        assert allgather[rank]["bytes_down"] == 0


def test_memsgd_downlink_is_dense_float():
    grads = gradients(seed=1, steps=1, n=2, d=256)
    results = simulate(2, run_exchange, "memsgd", grads, "fp16", None, "two_phase", {}, 1)
    assert results[0]["bytes_up"] == 128 * 2      # chunk 1, fp16
    assert results[0]["bytes_down"] == 128 * 8    # own chunk, float64, dense


# --- configuration checks ------------------------------------------------------------------------
def _mismatch(comm, field):
    settings = {"algorithm": "doublesqueeze", "up": "fp16", "period": None, "d": 64,
                "pattern": "two_phase"}
    if comm.rank == 1:
        settings[field] = {"algorithm": "liec", "up": "bf16", "d": 65,
                           "pattern": "allgather"}[field]
    hyper = {"period": 8} if settings["algorithm"] == "liec" else {}
    exchange = Exchange(make_algorithm(settings["algorithm"], up=settings["up"], **hyper), comm,
                        pattern=settings["pattern"])
    try:
        exchange.prepare({"bucket": (settings["d"], torch.float64)})
    except ConfigMismatchError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("field,named", [("algorithm", "algorithm"), ("up", "up"),
                                         ("d", "buckets.bucket"), ("pattern", "pattern")])
def test_mismatched_configuration_same_error_on_every_rank(field, named):
    messages = simulate(3, _mismatch, field, timeout=30)
    assert messages[0] is not None and len(set(messages)) == 1
    assert named in messages[0] and "rank 1" in messages[0]


def _lazy_mismatch(comm):
    algo = make_algorithm("psgd")
    exchange = Exchange(algo, comm)
    try:
        exchange.exchange("bucket", torch.ones(10 + comm.rank, dtype=torch.float64))
    except ConfigMismatchError as exc:
        return str(exc)


def test_unprepared_buckets_started_in_different_orders_pair_correctly():
    # odd ranks start the buckets in reverse order; the lazy configuration checks pair by key
    grads = gradients(seed=2, steps=2, n=3, d=400, dyadic=True)
    results = simulate(3, run_exchange, "psgd", grads, "none", "none", "two_phase", {}, 3,
                       prepare=False, timeout=30)
    for t in range(2):
        for rank in range(3):
            assert torch.equal(results[rank]["updates"][t], grads[t].sum(0) * (1.0 / 3))


def test_first_exchange_checks_configuration_when_not_prepared():
    messages = simulate(2, _lazy_mismatch, timeout=30)
    assert messages[0] is not None and messages[0] == messages[1]
    assert "buckets.bucket" in messages[0]


# --- factory and argument errors -----------------------------------------------------------------
def test_make_algorithm_builds_each_algorithm():
    for name in ALGORITHM_NAMES:
        algo = make_algorithm(name, up="fp16")
        assert algo.name == name and algo.up.spec() == "fp16"
    assert make_algorithm("memsgd", up="fp16").down.spec() == "none"
    assert make_algorithm("memsgd", up="fp16", down="none").down.spec() == "none"
    with pytest.raises(ValueError, match="sends its downlink dense.*cannot be honoured"):
        make_algorithm("memsgd", up="fp16", down="fp16")   # never accepted and then ignored
    assert make_algorithm("liec", period=5).config()["period"] == 5
    assert set(ALGORITHM_NAMES) <= set(ALGORITHMS)


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "liecc"}, "unknown algorithm 'liecc'"),
    ({"name": "liec", "periodd": 3}, "no parameter"),
    ({"name": "memsgd", "period": 3}, "no parameter"),
    ({"name": "liec", "period": 0}, "period must be a positive integer"),
    ({"name": "psgd", "up": "nosuch"}, "unknown compressor"),
])
def test_make_algorithm_refuses_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_algorithm(**kwargs)


def _bad_use(comm, case):
    exchange = Exchange(make_algorithm("psgd"), comm)
    g = torch.ones(8, dtype=torch.float64)
    if case == "twice":
        exchange.exchange("k", g)
        exchange.exchange("k", g)
    elif case == "resized":
        exchange.exchange("k", g)
        exchange.end_round()
        exchange.exchange("k", torch.ones(9, dtype=torch.float64))
    elif case == "unfinished":
        exchange.start("k", g)
        exchange.end_round()


@pytest.mark.parametrize("case,message", [("twice", "already exchanged"),
                                          ("resized", "fixed at its first exchange"),
                                          ("unfinished", "still in flight")])
def test_exchange_misuse_raises_clear_errors(case, message):
    with pytest.raises(ValueError, match=message):
        simulate(1, _bad_use, case, timeout=30)


def test_allreduce_pattern_refuses_nonlinear_compressor():
    compressor_or_skip("sign")
    with pytest.raises(ValueError, match="linear"):
        simulate(1, lambda comm: Exchange(make_algorithm("psgd", up="sign"), comm,
                                          pattern="allreduce"))
    with pytest.raises(ValueError, match="unknown exchange pattern"):
        simulate(1, lambda comm: Exchange(make_algorithm("psgd"), comm, pattern="ring"))


# --- benchmark helper ----------------------------------------------------------------------------
def test_bytes_benchmark_two_phase_flat_allgather_linear():
    compressor_or_skip("sign")
    from hvdcomp.bench.bytes import bytes_per_rank
    rows = bytes_per_rank(sizes=(2, 4, 8), numel=4096, algorithm="doublesqueeze", up="sign")
    by = {(r["pattern"], r["world_size"]): r for r in rows}
    two = [by["two_phase", n]["total"] for n in (2, 4, 8)]
    gather = [by["allgather", n]["total"] for n in (2, 4, 8)]
    # two-phase: 2·(N−1)/N·|C| — bounded by 2·|C| (plus chunk headers); allgather: (N−1)·|C|
    payload = from_spec("sign").payload_nbytes(4096)
    assert all(total <= 2 * payload + 2 * 8 * 8 for total in two)
    assert gather == [(n - 1) * payload for n in (2, 4, 8)]


# --- GPU: tests/test_gpu_exchange.py (marker gpu) -------------------------------------------------
