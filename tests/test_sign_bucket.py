"""``sign`` is the papers' SignSGD, one scale per bucket, whatever the world size (issue 13 item 4).

The oracle below is written from the papers' formula, C(x) = (‖x‖₁/d)·sign(x) over the whole
bucket, in float64, without hvdcomp's compressors; the sharded exchange must agree with it for
1, 2 and 4 ranks (simulator and real Horovod ranks), while ``chunksign`` — one scale per rank's
chunk — must not (it is blockwise sign with N blocks).
"""
from __future__ import annotations

import pytest
import torch

from hvdcomp.comm import simulate
from hvdcomp.compressors import from_spec

from multirank import require, run_ranks
from oracle import gradients, oracle, per_chunk, plain_chunks, run_exchange


def whole_sign(x: torch.Tensor) -> torch.Tensor:
    """SignSGD with its scale, float64, sign(0) = +1; the scale rounded to fp32 as on the wire."""
    scale = torch.tensor(float(x.abs().sum() / x.numel()), dtype=torch.float32).double()
    return torch.where(x >= 0, scale, -scale)


def test_sign_alone_is_the_whole_vector_formula():
    x = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    decoded = from_spec("sign").roundtrip(x)[1]
    assert torch.equal(decoded, whole_sign(x))


def test_sign_uses_the_bucket_norm_it_is_given():
    x = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    chunk = x[64:128]
    bucket = (x.abs().sum(), x.numel())
    out = torch.empty_like(chunk)
    from_spec("sign").roundtrip_into(chunk, out, 0, bucket=bucket)
    assert torch.equal(out, whole_sign(x)[64:128])


@pytest.mark.parametrize("algorithm", ["doublesqueeze", "liec", "memsgd"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_sharded_sign_equals_whole_bucket_sign(algorithm, n):
    d = 1000
    grads = gradients(seed=13, steps=5, n=n, d=d)
    hyper = {"period": 3} if algorithm == "liec" else {}
    down_spec = None if algorithm == "memsgd" else "sign"   # MEM-SGD's downlink is dense
    results = simulate(n, run_exchange, algorithm, grads, "sign", down_spec, "two_phase", hyper, 1)
    down = (lambda x: x) if algorithm == "memsgd" else whole_sign
    expected = oracle(algorithm, grads, whole_sign, down, period=3)
    for rank in range(n):
        torch.testing.assert_close(results[rank]["updates"], expected[:, rank], rtol=0,
                                   atol=1e-12)


def test_chunksign_is_one_scale_per_chunk_and_differs_from_sign():
    n, d = 4, 1000
    grads = gradients(seed=14, steps=3, n=n, d=d)
    results = simulate(n, run_exchange, "doublesqueeze", grads, "chunksign", "chunksign",
                       "two_phase", {}, 1)
    blockwise = per_chunk(whole_sign, plain_chunks(d, n))
    expected = oracle("doublesqueeze", grads, blockwise, blockwise)
    torch.testing.assert_close(results[0]["updates"], expected[:, 0], rtol=0, atol=1e-12)
    whole = oracle("doublesqueeze", grads, whole_sign, whole_sign)
    assert not torch.allclose(results[0]["updates"], whole[:, 0])


def test_sign_downlink_counts_the_norm_allgather():
    n, d = 4, 1000
    grads = gradients(seed=15, steps=1, n=n, d=d)
    signs = simulate(n, run_exchange, "doublesqueeze", grads, "sign", "sign", "two_phase", {}, 1)
    chunks = simulate(n, run_exchange, "doublesqueeze", grads, "chunksign", "chunksign",
                      "two_phase", {}, 1)
    for rank in range(n):
        assert signs[rank]["bytes_up"] == chunks[rank]["bytes_up"]
        assert signs[rank]["bytes_down"] == chunks[rank]["bytes_down"] + (n - 1) * 8


def _ranks_sign(up):
    import horovod.torch as hvd
    from hvdcomp.comm import HorovodCommunicator
    n = hvd.size()
    grads = gradients(seed=16, steps=4, n=n, d=777)
    result = run_exchange(HorovodCommunicator(), "liec", grads, up, up, "two_phase",
                          {"period": 3}, 2)
    return result["updates"], result["cuts"]


@pytest.mark.parametrize("n", [2, 4])
def test_real_ranks_sign_equals_whole_bucket_sign(n):
    require("mpi")
    results = run_ranks(_ranks_sign, np=n, controller="mpi", up="sign")
    grads = gradients(seed=16, steps=4, n=n, d=777)
    # two buckets (run_exchange cuts the gradient): the oracle applies sign to each bucket
    cuts = results[0][1]

    def per_bucket(x):
        return torch.cat([whole_sign(x[a:b]) for a, b in zip(cuts, cuts[1:])])
    expected = oracle("liec", grads, per_bucket, per_bucket, period=3)
    for rank in range(n):
        torch.testing.assert_close(results[rank][0], expected[:, rank], rtol=0, atol=1e-12)


@pytest.mark.parametrize("road", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel,n", [(1000, 2), (4099, 3), (130, 4), (64, 3)])
def test_a_buckets_chunks_at_once_give_each_chunks_payload(numel, n, dtype, road, monkeypatch):
    """The worker encodes its chunks in one pass (bits and bucket norm together); each payload
    and decoded chunk equals the chunk encoded alone with the bucket's norm, bit for bit (with
    the C kernels and without, float32 and float64, uneven and empty chunks)."""
    from hvdcomp.exchange_codec import chunk_bounds
    monkeypatch.setenv("HVDCOMP_NATIVE", "1" if road == "native" else "0")
    if road == "native":
        from hvdcomp.compressors import _native
        if _native.library() is None:
            pytest.skip(f"C kernels unavailable: {_native.status()}")
    sign = from_spec("sign")
    x = torch.randn(numel, dtype=dtype, generator=torch.Generator().manual_seed(numel))
    x[::7] = 0.0
    x[1::11] = -0.0
    bounds = chunk_bounds(numel, n)
    out = torch.full_like(x, float("nan"))
    payloads = sign.roundtrip_chunks_into(x, bounds, out)
    bucket = (sign.partial_norm(x), numel)
    for (a, b), payload in zip(bounds, payloads):
        alone = torch.empty(b - a, dtype=dtype)
        expected = sign.roundtrip_into(x[a:b], alone, bucket=bucket) if b > a else \
            torch.empty(0, dtype=torch.uint8)
        assert torch.equal(payload, expected), (a, b)
        assert torch.equal(out[a:b], alone), (a, b)


@pytest.mark.parametrize("road", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("numel", [0, 1, 63, 64, 1000, 4099])
def test_a_servers_unscaled_payload_gives_the_norm_and_payload_of_two_passes(numel, dtype, road,
                                                                              monkeypatch):
    """A server takes its chunk's norm and bits in one pass (encode_unscaled), then writes the
    bucket's scale: the norm is partial_norm's and the payload compress's, bit for bit."""
    monkeypatch.setenv("HVDCOMP_NATIVE", "1" if road == "native" else "0")
    if road == "native":
        from hvdcomp.compressors import _native
        if _native.library() is None:
            pytest.skip(f"C kernels unavailable: {_native.status()}")
    sign = from_spec("sign")
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).to(dtype)
    x[::7] = 0.0
    x[1::11] = -0.0
    unscaled, norm = sign.encode_unscaled(x)
    assert torch.equal(norm, sign.partial_norm(x)) and norm.dtype == sign.partial_norm(x).dtype
    bucket = (norm.double() * 3, 3 * numel + 1)       # the chunk of a larger bucket
    expected = sign.compress(x, bucket=bucket)
    assert torch.equal(sign.compress(x, bucket=bucket, unscaled=unscaled), expected)
    if numel:
        out, alone = torch.empty_like(x), torch.empty_like(x)
        payload = sign.roundtrip_into(x, out, bucket=bucket, unscaled=sign.encode_unscaled(x)[0])
        assert torch.equal(payload, sign.roundtrip_into(x, alone, bucket=bucket))
        assert torch.equal(out, alone)


@pytest.mark.parametrize("algorithm", ["liec", "doublesqueeze"])
def test_a_server_reads_its_chunk_once_for_norm_and_bits(algorithm, monkeypatch):
    """No separate norm pass in a round: the server's norm comes with its bits."""
    from hvdcomp.algorithms import make_algorithm
    from hvdcomp.compressors.sign import Sign
    from hvdcomp.exchange import Exchange
    separate = []
    original = Sign.partial_norm
    monkeypatch.setattr(Sign, "partial_norm",
                        staticmethod(lambda x: separate.append(x.numel()) or original(x)))

    def rounds(comm):
        exchange = Exchange(make_algorithm(algorithm, up="sign", down="sign"), comm)
        for step in range(2):
            grad = torch.randn(1000, generator=torch.Generator().manual_seed(step + comm.rank))
            exchange.finish(exchange.start("b", grad, update_into=grad))
            exchange.end_round()
    simulate(2, rounds)
    assert separate == []


def test_a_servers_chunk_holding_nan_is_refused_with_the_unscaled_payload():
    from hvdcomp.compressors.base import CompressionError
    sign = from_spec("sign")
    x = torch.randn(1000)
    x[900] = float("nan")
    unscaled, norm = sign.encode_unscaled(x)
    assert not torch.isfinite(norm)
    with pytest.raises(CompressionError, match="1 of 1000 elements"):
        sign.compress(x, bucket=(norm.double(), 2000), unscaled=unscaled)


def test_a_bucket_holding_nan_is_refused_once_with_its_count():
    from hvdcomp.compressors.base import CompressionError
    x = torch.randn(1000)
    x[900] = float("nan")
    with pytest.raises(CompressionError, match="1 of 1000 elements"):
        from_spec("sign").roundtrip_chunks_into(x, [(0, 512), (512, 1000)], torch.empty(1000))
