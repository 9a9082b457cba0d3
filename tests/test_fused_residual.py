"""The fused residual: error feedback's x − C(x) written over x in the compressor's pass, and
LIEC-SGD's C(v) decoded onto r_i (Algorithm.worker_residual / server_residual).

The five steps as written are the reference: every fused value is compared bit for bit with
them (the same algorithm with its declarations switched off), on real simulated ranks, with and
without the C kernels.  What the fusion saves is checked as held bytes: LIEC-SGD keeps r_i in
the caller's buffer, not in a bucket per bucket."""
from __future__ import annotations

import contextlib

import pytest
import torch

from hvdcomp.algorithms import make_algorithm
from hvdcomp.comm.simulator import simulate
from hvdcomp.compressors import _native, from_spec
from hvdcomp.exchange import Exchange, finish_in_order
from hvdcomp.exchange_buffers import held_bytes
from hvdcomp.exchange_codec import (chunk_bounds, decode_mean_into,
                                    residual_chunks, residual_into, roundtrip_chunks_into,
                                    roundtrip_into, subtracts_in_pass, worker_bucket_norm)

ROADS = ["native", "reference"] if _native.library() is not None else ["reference"]
COMPRESSORS = ["sign", "chunksign", "blocksign:block=64", "topk:ratio=0.1", "qsgd", "none"]
SIZES = (4096, 1000, 2500, 70)  # 1000, 2500 leave short last chunks; 70 an empty one (N = 3)


@contextlib.contextmanager
def road(name: str):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HVDCOMP_NATIVE", "1" if name == "native" else "0")
        yield


def _vector(numel: int, seed: int) -> torch.Tensor:
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    x[::17] = 0.0                      # zeros send sign +1: the residual is then −scale
    x[1::23] = -0.0
    return x


def _scratch_of(numel: int):
    buffer = torch.full((numel,), float("nan"))      # garbage, as the exchange's scratch
    return lambda n: buffer[:n]


@pytest.mark.parametrize("road_name", ROADS)
@pytest.mark.parametrize("spec", COMPRESSORS)
def test_residual_is_x_minus_the_decoded_payload_bit_for_bit(spec, road_name):
    compressor = from_spec(spec)
    with road(road_name):
        for numel, seed in [(1000, 1), (4096, 2), (7, 3)]:
            x = _vector(numel, seed)
            bucket = worker_bucket_norm(compressor, x)
            decoded = torch.empty(numel)
            expected_payload = roundtrip_into(compressor, x, decoded, 5, bucket).clone()
            expected = torch.sub(x, decoded)
            payload = residual_into(compressor, x, _scratch_of(numel), 5, bucket)
            assert torch.equal(payload, expected_payload)
            assert torch.equal(x.view(torch.int32), expected.view(torch.int32)), spec


@pytest.mark.parametrize("road_name", ROADS)
@pytest.mark.parametrize("spec", ["sign", "chunksign", "topk:ratio=0.1"])
def test_worker_chunks_residual_equals_roundtrip_then_subtract(spec, road_name):
    compressor = from_spec(spec)
    with road(road_name):
        for numel, n in [(1000, 3), (4096, 2), (64, 4)]:
            x = _vector(numel, numel + n)
            bounds = chunk_bounds(numel, n)
            seeds = list(range(n))
            decoded = torch.empty(numel)
            expected_payloads = [p.clone() for p in
                                 roundtrip_chunks_into(compressor, x, bounds, decoded, seeds)]
            expected = torch.sub(x, decoded)
            payloads, subtract = residual_chunks(compressor, x, bounds, _scratch_of(numel),
                                                 seeds)
            assert all(torch.equal(a, b) for a, b in zip(payloads, expected_payloads))
            subtract()               # sign: after the uplink is launched, in the exchange
            assert all(torch.equal(a, b) for a, b in zip(payloads, expected_payloads))
            assert torch.equal(x.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("road_name", ROADS)
@pytest.mark.parametrize("spec", ["sign", "chunksign", "topk:ratio=0.1"])
def test_the_gradient_added_in_the_encoders_pass_is_add_then_residual_bit_for_bit(spec,
                                                                                  road_name):
    """p = g + e written over e in the encoder's pass (``residual_chunks(..., addend=g)``, the
    worker step of MEM-SGD and DoubleSqueeze) equals ``torch.add(g, e, out=e)`` followed by the
    residual: the same payloads, and the same e − C(e) left in e, signed zeros included."""
    compressor = from_spec(spec)
    with road(road_name):
        for numel, n in [(1000, 3), (4096, 2), (7, 2), (600_003, 2), (0, 2)]:
            gradient, error = _vector(numel, numel + n), _vector(numel, 7 * n) / 3
            error[2::29] = -error[2::29].abs() - 1.0
            gradient[2::29] = -error[2::29]          # sums of exactly +0.0
            error[3::31], gradient[3::31] = -0.0, -0.0   # and of −0.0
            bounds, seeds = chunk_bounds(numel, n), list(range(n))
            expected = torch.add(gradient, error)
            expected_payloads, subtract = residual_chunks(
                compressor, expected, bounds, _scratch_of(numel), seeds)
            expected_payloads = [p.clone() for p in expected_payloads]
            subtract()
            out = error.clone()
            payloads, subtract = residual_chunks(compressor, out, bounds, _scratch_of(numel),
                                                 seeds, addend=gradient)
            subtract()
            assert all(torch.equal(a, b) for a, b in zip(payloads, expected_payloads)), numel
            assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), numel


@pytest.mark.parametrize("road_name", ROADS)
@pytest.mark.parametrize("spec", ["sign", "chunksign"])
def test_the_compensated_update_in_one_pass_is_subtract_then_add_bit_for_bit(spec, road_name):
    """(x − C(x)) + C(v) from both payloads at once (the deferred r_i of LIEC-SGD and CSER)
    equals x − C(x) written first and C(v) added after, as the round did in two passes."""
    compressor = from_spec(spec)
    with road(road_name):
        for numel, seed in [(1000, 1), (4096, 2), (7, 3), (0, 4)]:
            x, v = _vector(numel, seed), 3.0 * _vector(numel, seed + 50)
            own = compressor.compress(x.clone(), 5)
            payload = compressor.compress(v, 6)
            expected = x.clone()
            compressor.decompress_sub_into(own, expected, torch.empty(numel), 5)
            compressor.decompress_add_into(payload, expected, torch.empty(numel), 6)
            out = x.clone()
            compressor.decompress_sub_add_into(own, payload, out, _scratch_of(numel)(numel),
                                               5, 6)
            assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), numel


@pytest.mark.parametrize("road_name", ROADS)
@pytest.mark.parametrize("spec", ["sign", "chunksign", "topk:ratio=0.1"])
def test_the_servers_v_in_one_pass_is_the_decoded_mean_then_added_bit_for_bit(spec, road_name):
    """v = e + m with m the mean of N decoded payloads, written over e in the decoder's pass
    (``decompress_mean_add_into``), equals m decoded into a buffer (``decode_mean_into``: the
    sum in rank order, times 1/N) and then added to e; where the compressor cannot (``topk``,
    or ``sign`` without the C kernels) it returns None and leaves e alone."""
    compressor = from_spec(spec)
    one_pass = spec != "topk:ratio=0.1" and road_name == "native"
    with road(road_name):
        for numel, n in [(1000, 1), (1000, 2), (4096, 3), (7, 4), (600_003, 2), (0, 2)]:
            vectors = [_vector(numel, 10 * n + j) * (j + 1) for j in range(n)]
            if numel:
                vectors[-1][:] = 0.0         # a zero scale: its table is ±0.0
            payloads = [compressor.compress(v, 7) for v in vectors]
            error = _vector(numel, 99) / 3
            mean = torch.full((numel,), float("nan"))
            decode_mean_into(compressor, payloads, mean, torch.full((numel,), float("nan")), 7)
            expected = error + mean
            out = error.clone()
            result = compressor.decompress_mean_add_into(payloads, out, 7)
            if not one_pass or not numel:
                assert result is None and torch.equal(out, error)
                continue
            assert result is out
            assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), (numel, n)


def test_only_sign_subtracts_in_its_decoders_pass():
    assert subtracts_in_pass(from_spec("sign")) and subtracts_in_pass(from_spec("chunksign"))
    assert not subtracts_in_pass(from_spec("topk:ratio=0.1"))


@pytest.mark.parametrize("road_name", ROADS)
def test_only_sign_decodes_onto_a_tensor_in_its_own_pass_and_only_where_its_kernels_run(
        road_name):
    """``decodes_onto`` is asked before the server's first e is made and before the worker's
    decode takes scratch: true exactly where the one-pass hooks run (float32 on CPU with the C
    kernels), so no −0.0 tensor is made in vain elsewhere (the pure-torch road, float64, a GPU:
    the meta device stands in for one here); and a hook given no scratch decodes into a fresh
    one off that road, with the same values."""
    cpu32 = torch.empty(8)
    with road(road_name):
        native = road_name == "native"
        for spec in ("sign", "chunksign"):
            compressor = from_spec(spec)
            assert compressor.decodes_onto(cpu32) == native, spec
            assert not compressor.decodes_onto(cpu32.double())
            assert not compressor.decodes_onto(torch.empty(8, device="meta"))
            x, v = _vector(1000, 1), _vector(1000, 2)
            own, payload = compressor.compress(x), compressor.compress(v)
            added = compressor.decompress_mean_add_into([payload], torch.zeros(1000))
            assert (added is not None) == native, spec
            expected = x - compressor.decompress(own, 1000) + compressor.decompress(payload, 1000)
            out = x.clone()
            compressor.decompress_sub_add_into(own, payload, out, None)
            assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), spec
            out = x.clone()
            compressor.decompress_add_into(payload, out, None)
            assert torch.equal(out, x + compressor.decompress(payload, 1000)), spec
        assert not any(from_spec(spec).decodes_onto(cpu32)
                       for spec in ("topk:ratio=0.1", "qsgd", "none", "blocksign"))


def _rounds(comm, name, up, down, fused):
    """Five rounds of three buckets, finished pipelined as the optimizer does, each gradient in
    the buffer that is also ``update_into``: the updates, the algorithm's state, held bytes."""
    hyper = {"period": 4} if name in ("liec", "cser") else {}   # round 3 is an exact round
    algo = make_algorithm(name, up=up, down=down, **hyper)
    if not fused:           # the five steps as written
        algo.worker_residual, algo.server_residual = None, False
        algo.server_adds_mean_to = algo.worker_adds_gradient_to = None
    exchange = Exchange(algo, comm)
    updates = []
    for step in range(5):
        flats = [_vector(d, 100 * comm.rank + 10 * step + k) for k, d in enumerate(SIZES)]
        handles = [exchange.start(f"b{k}", f, update_into=f) for k, f in enumerate(flats)]
        for flat, update in zip(flats, finish_in_order((exchange, h) for h in handles)):
            assert update.data_ptr() == flat.data_ptr()    # every round kind, exact ones too
            updates.append(update.clone())
        exchange.end_round()
    state = {f: {k: v.clone() for k, v in getattr(algo, f).items()} for f in algo.state_fields}
    return updates, state, held_bytes(exchange), exchange.buffers


@pytest.mark.parametrize("road_name", ROADS)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name,up,down", [
    ("liec", "sign", "sign"), ("liec", "topk:ratio=0.1", "sign"), ("liec", "chunksign", None),
    ("doublesqueeze", "sign", "sign"), ("doublesqueeze", "sign", "topk:ratio=0.1"),
    ("memsgd", "sign", None), ("memsgd", "topk:ratio=0.1", None), ("cser", "sign", None)])
def test_fused_rounds_equal_the_five_steps_bit_for_bit(name, up, down, n, road_name):
    with road(road_name):
        fused = simulate(n, _rounds, name, up, down, True)
        steps = simulate(n, _rounds, name, up, down, False)
    for rank, ((updates, state, _, _), (expected, expected_state, _, _)) in enumerate(
            zip(fused, steps)):
        assert len(updates) == len(expected) == 5 * len(SIZES)
        for i, (a, b) in enumerate(zip(updates, expected)):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (rank, i)
        assert state.keys() == expected_state.keys()
        for field, tensors in state.items():
            assert tensors.keys() == expected_state[field].keys(), field
            for key, tensor in tensors.items():
                assert torch.equal(tensor, expected_state[field][key]), (rank, field, key)


@pytest.mark.parametrize("name", ["memsgd", "doublesqueeze"])
def test_the_worker_adds_the_gradient_in_the_encoders_pass_after_the_first_round(name):
    """With ``sign`` on the C road, ``worker_message`` runs in the first round only (it creates
    e_i as g_i's copy); every later round adds g_i in the encoder's pass, so the bit-for-bit
    comparison above compares the fused step, not the five steps with themselves."""
    if _native.library() is None:
        pytest.skip("the C kernels are not built here")

    def count_messages(comm):
        algo = make_algorithm(name, up="sign", down="sign" if name == "doublesqueeze" else None)
        calls = []
        written = algo.worker_message
        algo.worker_message = lambda key, grad: calls.append(key) or written(key, grad)
        exchange = Exchange(algo, comm)
        for step in range(3):
            flat = _vector(4096, 10 * comm.rank + step)
            exchange.finish(exchange.start("b", flat, update_into=flat))
            exchange.end_round()
        return calls
    with road("native"):
        assert simulate(2, count_messages) == [["b"], ["b"]]


@pytest.mark.parametrize("n", [2, 3])
def test_liec_keeps_r_i_in_the_callers_buffer_not_a_bucket_per_bucket(n):
    """The five steps keep r_i in one exchange buffer per bucket (the model, across rounds);
    fused, r_i is in the caller's buffer, and with the C kernels there is no scratch at all
    (without them, scratch shared by every bucket: one chunk for the worker's decode, two where
    the server decodes the mean into a buffer)."""
    fused = simulate(n, _rounds, "liec", "sign", "sign", True)
    steps = simulate(n, _rounds, "liec", "sign", "sign", False)
    model = 4 * sum(SIZES)
    for rank, ((_, state, held, _), (_, _, held_steps, _)) in enumerate(zip(fused, steps)):
        errors = sum(t.numel() * 4 for t in state["server_error"].values())
        own = max(b - a for d in SIZES for a, b in [chunk_bounds(d, n)[rank]])
        largest_chunk = max(chunk_bounds(d, n)[0][1] for d in SIZES)
        # the server takes two chunks of scratch, and the worker's decode one, only off the C
        # kernels: with them v = m + e and (g − C(g)) + C(v) are written in the decoder's pass
        native = _native.library() is not None
        server_scratch, worker_scratch = (0, 0) if native else (2 * own, largest_chunk)
        assert held == errors + 4 * max(server_scratch, worker_scratch), rank
        assert held_steps >= errors + model, rank      # the "sent" buffers: the model
