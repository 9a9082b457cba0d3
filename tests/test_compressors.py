"""Compressors against independent oracles: byte formulas, δ-contraction, lossless round trips,
packing, parameter validation and NaN refusal (issue 3).

Oracles are written plainly in float64 here; they do not call the code under test except to get
the payload being checked.  Random inputs come from a torch generator seeded by hypothesis, so a
failing example replays exactly.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hvdcomp.compressors import (REGISTRY, CompressionError, from_spec, pack_payloads,
                                 split_payloads)
from hvdcomp.compressors import base as compressor_base

REPO = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=40, deadline=None)
RATIOS = [0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 1.0]
SPECS = ["none", "fp16", "bf16", "topk:ratio=0.1", "topk:fp16_values=True,ratio=0.05",
         "randomk:ratio=0.1,seed=7", "sign", "blocksign:block=64", "blocksign:block=7",
         "dgc:ratio=0.01", "qsgd:levels=4", "qsgd:levels=1,rescale=True", "powersgd:rank=2"]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def sample(numel: int, seed: int, kind: str = "gauss", dtype=torch.float64) -> torch.Tensor:
    """Test vectors: Gaussian, heavy-tailed, sparse (many exact zeros), constant, all-zero."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen, dtype=torch.float64)
    if kind == "heavy":
        # |x| up to ~4000: heavy-tailed, yet inside fp16's range
        x = x / (torch.rand(numel, generator=gen, dtype=torch.float64) + 1e-3)
    elif kind == "sparse":
        x = x * (torch.rand(numel, generator=gen, dtype=torch.float64) < 0.1)
    elif kind == "constant":
        x = torch.full((numel,), -0.75, dtype=torch.float64)
    elif kind == "zero":
        x = torch.zeros(numel, dtype=torch.float64)
    return x.to(dtype)


KINDS = st.sampled_from(["gauss", "heavy", "sparse", "constant", "zero"])
LENGTHS = st.integers(min_value=0, max_value=3000)
SEEDS = st.integers(min_value=0, max_value=2 ** 31 - 1)


def sqnorm(x: torch.Tensor) -> float:
    return float(x.double().pow(2).sum())


def error(c, x, seed=0) -> float:
    """‖C(x) − x‖² in float64, C(x) decoded from the payload."""
    y = c.decompress(c.compress(x, seed), x.numel(), x.dtype, seed)
    return sqnorm(y.double() - x.double())


# --- byte formulas, written from the docstrings ---------------------------------------------------
def k_of(ratio: float, d: int) -> int:
    return min(d, math.ceil(Fraction(str(ratio)) * d))


def idx_bytes(d: int) -> int:
    return 1 if d <= 256 else 2 if d <= 65536 else 4


def expected_nbytes(spec: str, d: int, dtype=torch.float32) -> int:
    c = from_spec(spec)
    if c.name in ("none", "fp16", "bf16", "topk", "randomk", "dgc"):
        return _dense_or_sparse_nbytes(c, d, dtype)
    if d == 0:
        return 0
    if c.name == "sign":
        return 4 + math.ceil(d / 8)
    if c.name == "blocksign":
        return 4 * math.ceil(d / c.block) + math.ceil(d / 8)
    if c.name == "qsgd":
        bits = math.ceil(math.log2(2 * c.levels + 1))
        return 4 + math.ceil(d * bits / 8)
    if c.name == "powersgd":
        m = math.ceil(math.sqrt(d))
        while m * m < d:  # guard float sqrt
            m += 1
        n = math.ceil(d / m)
        r = min(c.rank, n, m)
        return 4 * r * (n + m)
    raise AssertionError(c.name)


def _dense_or_sparse_nbytes(c, d: int, dtype) -> int:
    """Bytes of the casts and the sparsifiers (their formulas hold at d = 0 too)."""
    if c.name == "none":
        return d * torch.empty((), dtype=dtype).element_size()
    if c.name in ("fp16", "bf16"):
        return 2 * d
    k = k_of(c.ratio, d)
    if c.name == "topk":
        return k * (2 if c.fp16_values else 4) + k * idx_bytes(d)
    if c.name == "randomk":
        return 4 * k
    return 4 * k + k * idx_bytes(d)          # dgc


def test_registry_holds_every_compressor():
    from_spec("none")  # loads the built-in modules
    assert {"none", "fp16", "bf16", "topk", "randomk", "sign", "blocksign", "dgc", "qsgd",
            "powersgd"} <= set(REGISTRY)


@pytest.mark.parametrize("spec", SPECS)
@SETTINGS
@given(d=LENGTHS, seed=SEEDS, kind=KINDS)
def test_bytes_on_the_wire_match_the_formula(spec, d, seed, kind):
    c = from_spec(spec)
    for dtype in (torch.float32, torch.float64):
        x = sample(d, seed, kind, dtype)
        untouched = x.clone()
        payload = c.compress(x, seed)
        assert torch.equal(x, untouched)  # compress never writes to its input
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == c.payload_nbytes(d, dtype) == expected_nbytes(spec, d, dtype)
        y = c.decompress(payload, d, dtype, seed)
        assert y.dtype == dtype and y.shape == (d,) and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_any_dtype_in_same_dtype_out(spec, dtype):
    c = from_spec(spec)
    x = sample(1001, 3, "gauss", dtype)
    y = c.decompress(c.compress(x, 11), 1001, dtype, 11)
    assert y.dtype == dtype and y.shape == (1001,)
    assert error(c, x, 11) <= 2.0 * sqnorm(x) * (1 + 1e-6) or c.name == "qsgd"


# --- lossless and cast compressors ----------------------------------------------------------------
@SETTINGS
@given(d=LENGTHS, seed=SEEDS, kind=KINDS, dtype=st.sampled_from(FLOAT_DTYPES))
def test_none_is_bit_exact(d, seed, kind, dtype):
    c = from_spec("none")
    x = sample(d, seed, kind, dtype)
    y = c.decompress(pack_payloads([c.compress(x)]).clone(), d, dtype)
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))


@SETTINGS
@given(d=LENGTHS, seed=SEEDS, kind=KINDS)
def test_casts_are_bit_exact_on_their_own_dtype_and_round_to_nearest(d, seed, kind):
    for spec, wire, unit in (("fp16", torch.float16, 2.0 ** -11),
                             ("bf16", torch.bfloat16, 2.0 ** -8)):
        c = from_spec(spec)
        own = sample(d, seed, kind, wire)
        assert torch.equal(c.decompress(c.compress(own), d, wire).view(torch.uint8),
                           own.view(torch.uint8))
        x = sample(d, seed, kind, torch.float64)
        y = c.decompress(c.compress(x), d, torch.float64)
        # relative error of round-to-nearest: at most half an ulp (= unit) per normal element
        tiny = 6.2e-5 if wire == torch.float16 else 1.2e-38
        assert bool(((y - x).abs() <= unit * x.abs() + tiny * unit).all())
        assert sqnorm(y - x) <= unit ** 2 * sqnorm(x) + d * (tiny * unit) ** 2


def test_fp16_overflow_is_refused_not_sent_as_inf():
    x = torch.tensor([1.0, 70000.0, -2.0])
    with pytest.raises(CompressionError, match="NaN or Inf"):
        from_spec("fp16").compress(x)
    with pytest.raises(CompressionError):
        from_spec("topk:ratio=1.0,fp16_values=True").compress(x)


def test_linear_compressors_sum_as_their_wire_dtype():
    xs = [sample(999, s) for s in range(3)]
    for spec in ("none", "fp16", "randomk:ratio=0.2,seed=5"):
        c = from_spec(spec)
        assert c.linear
        payloads = [c.compress(x, seed=42) for x in xs]
        wire = c.wire_dtype(torch.float64)
        summed = sum(p.view(wire).double() for p in payloads).to(wire).view(torch.uint8)
        decoded_sum = c.decompress(summed, 999, torch.float64, seed=42)
        sum_decoded = sum(c.decompress(p, 999, torch.float64, seed=42) for p in payloads)
        assert torch.allclose(decoded_sum, sum_decoded, rtol=2e-3, atol=1e-2)
    for spec in ("bf16", "topk", "sign", "blocksign", "dgc", "qsgd", "powersgd"):
        c = from_spec(spec)
        assert not c.linear
        with pytest.raises(TypeError):
            c.wire_dtype()


# --- sparsifiers ----------------------------------------------------------------------------------
@SETTINGS
@given(d=LENGTHS, seed=SEEDS, kind=KINDS, ratio=st.sampled_from(RATIOS))
def test_topk_keeps_the_k_largest_exactly(d, seed, kind, ratio):
    c = from_spec(f"topk:ratio={ratio}")
    x = sample(d, seed, kind, torch.float32)
    y = c.decompress(c.compress(x), d)
    k = k_of(ratio, d)
    kept = y != 0
    # every kept element is sent exactly; nothing smaller than a dropped one is kept
    assert torch.equal(y[kept], x[kept])
    if d:
        magnitudes = x.abs().double().sort(descending=True).values
        assert sqnorm(y) == pytest.approx(float(magnitudes[:k].pow(2).sum()), rel=1e-6, abs=1e-30)
    # δ = k/d deterministically
    assert sqnorm(y - x) <= (1 - (k / d if d else 0)) * sqnorm(x) * (1 + 1e-6) + 1e-30


@SETTINGS
@given(d=st.integers(1, 3000), seed=SEEDS, kind=KINDS)
def test_topk_fp16_values_within_rounding_of_the_bound(d, seed, kind):
    c = from_spec("topk:ratio=0.05,fp16_values=True")
    x = sample(d, seed, kind, torch.float64).clamp(-60000, 60000)
    k = k_of(0.05, d)
    y = c.decompress(c.compress(x), d, torch.float64)
    assert sqnorm(y - x) <= (1 - k / d) * sqnorm(x) + 2 ** -22 * sqnorm(y) * 1.01 + 1e-12


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "sparse", "spikes_on_the_sample"])
def test_topk_cpu_selection_is_exact_on_large_chunks(ratio, kind):
    # chunks ≥ 2^14 take the sampled-threshold road on CPU; torch.topk is the oracle.
    d = 65536
    if kind == "spikes_on_the_sample":
        # every 64th element large, the rest tiny: the sample threshold lets too few through
        # and the selection must fall back to a full selection
        x = torch.randn(d) * 1e-3
        x[::64] = torch.arange(1, d // 64 + 1, dtype=torch.float32)
    else:
        x = sample(d, 8, kind, torch.float32)
    c = from_spec(f"topk:ratio={ratio}")
    k = k_of(ratio, d)
    y = c.decompress(c.compress(x), d)
    expected = torch.topk(x.abs(), k).values.double().pow(2).sum()
    assert int((y != 0).sum()) <= k and sqnorm(y) == pytest.approx(float(expected), rel=1e-6)
    assert torch.equal(y[y != 0], x[y != 0])


def test_topk_index_width_follows_the_chunk_length():
    c = from_spec("topk:ratio=1.0")
    for d, width in ((256, 1), (257, 2), (65536, 2), (65537, 4)):
        x = torch.arange(d, dtype=torch.float32) - d / 2
        payload = c.compress(x)
        assert payload.numel() == d * (4 + width)
        assert torch.equal(c.decompress(payload, d), x)  # index 0..d-1 all survive the offset


def test_randomk_expected_contraction_and_shared_indices():
    d, ratio = 500, 0.1
    c = from_spec(f"randomk:ratio={ratio},seed=3")
    k = k_of(ratio, d)
    delta = 1 - (1 - 1 / d) ** k
    x = sample(d, 1, "heavy")
    errors = [error(c, x, seed) for seed in range(400)]
    mean = sum(errors) / len(errors)
    # E‖C(x)−x‖² = (1−δ)‖x‖²; 400 draws of a bounded variable: 10 % slack is > 5 sigma here
    assert mean == pytest.approx((1 - delta) * sqnorm(x), rel=0.1)
    # the indices come from (compressor seed, step seed) only: two senders agree
    other = from_spec(f"randomk:ratio={ratio},seed=3")
    cpu = torch.device("cpu")
    assert torch.equal(c.indices(d, 9, cpu), other.indices(d, 9, cpu))
    assert not torch.equal(c.indices(d, 9, cpu), c.indices(d, 10, cpu))
    # only values travel: the decoded vector holds x at the drawn indices, zeros elsewhere
    y = c.decompress(c.compress(x, 9), d, torch.float64, 9)
    drawn = c.indices(d, 9, torch.device("cpu"))
    mask = torch.zeros(d, dtype=torch.bool)
    mask[drawn] = True
    assert torch.equal(y[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    assert torch.allclose(y[mask], x[mask].float().double())


def dgc_reference(x: torch.Tensor, c, seed: int) -> torch.Tensor:
    """DGC's _sparsify as published (research notes §3.2), float64, on the same sample."""
    d = x.numel()
    k = k_of(c.ratio, d)
    stride, n_samples, k_samples = c.sampling(d)
    importance = x.abs()
    samples = importance[c.sample_start(stride, seed)::stride] if stride > 1 else importance
    threshold = torch.topk(samples, k_samples).values.min()
    indices = (importance >= threshold).nonzero().view(-1)
    if d > n_samples:
        for _ in range(10):
            if len(indices) > k:
                if len(indices) > 1.3 * k:
                    indices = indices[torch.topk(importance[indices], k).indices]
                break
            if len(indices) < 0.8 * k:
                threshold = threshold * 0.8
                indices = (importance >= threshold).nonzero().view(-1)
            else:
                break
    indices = indices[:k]
    out = torch.zeros_like(x)
    out[indices] = x[indices]
    return out


@SETTINGS
@given(d=st.integers(0, 20000), seed=SEEDS, kind=st.sampled_from(["gauss", "heavy", "sparse"]),
       ratio=st.sampled_from([0.001, 0.01, 0.05]))
def test_dgc_matches_the_reference_on_both_code_paths(d, seed, kind, ratio):
    x = sample(d, seed, kind, torch.float32)
    expected = dgc_reference(x.double(), from_spec(f"dgc:ratio={ratio}"), seed) if d else x.double()
    for branch_free in (False, True):
        c = from_spec(f"dgc:ratio={ratio}")
        c._branch_free = branch_free
        y = c.decompress(c.compress(x, seed), d, torch.float64, seed)
        assert torch.equal(y, expected)
        # keeps what it sends exactly: ‖C(x)−x‖² = ‖x‖² − ‖x_S‖², and sends something if x ≠ 0
        assert sqnorm(y - x) == pytest.approx(sqnorm(x) - sqnorm(y), rel=1e-9, abs=1e-12)
        if sqnorm(x) > 0:
            assert sqnorm(y) > 0


def test_dgc_pads_when_fewer_than_k_pass_the_threshold():
    # 40 spikes on the sampled positions: the sample threshold is a spike, and lowering it
    # 10 times (to 0.8^10 ≈ 0.107 of it) still selects only the 40 spikes < 0.8·k = 80.
    d, ratio, seed = 10000, 0.01, 5
    c = from_spec(f"dgc:ratio={ratio}")
    stride, _, _ = c.sampling(d)
    start = c.sample_start(stride, seed)
    x = torch.randn(d, generator=torch.Generator().manual_seed(0)) * 1e-3
    spikes = torch.arange(start, d, stride)[:40]
    x[spikes] = 1.0
    for branch_free in (False, True):
        c._branch_free = branch_free
        payload = c.compress(x, seed)
        assert payload.numel() == 100 * (4 + 2)
        y = c.decompress(payload, d, torch.float32, seed)
        expected = torch.zeros(d)
        expected[spikes] = 1.0
        assert torch.equal(y, expected)


# --- sign family ----------------------------------------------------------------------------------
def scaled_sign_oracle(x: torch.Tensor, block: int) -> torch.Tensor:
    """(‖x_b‖₁/d_b)·sign(x) per block, sign(0) = +1, in float64 with an fp32-rounded scale."""
    out = torch.empty(x.numel(), dtype=torch.float64)
    for start in range(0, x.numel(), block):
        xb = x[start:start + block].double()
        scale = float(torch.tensor(float(xb.abs().sum()) / xb.numel(), dtype=torch.float32))
        out[start:start + block] = torch.where(xb >= 0, scale, -scale)
    return out


@SETTINGS
@given(d=LENGTHS, seed=SEEDS, kind=KINDS, block=st.sampled_from([None, 1, 7, 8, 64, 1000]),
       dtype=st.sampled_from(FLOAT_DTYPES))
def test_sign_and_blocksign_match_the_oracle_and_the_exact_error(d, seed, kind, block, dtype):
    c = from_spec("sign") if block is None else from_spec(f"blocksign:block={block}")
    x = sample(d, seed, kind, dtype)
    y = c.decompress(c.compress(x), d, torch.float64)
    oracle = scaled_sign_oracle(x, block or max(d, 1))
    assert torch.allclose(y, oracle, rtol=1e-5, atol=0)  # fp32 accumulation of the norm
    # ‖C(x)−x‖² = Σ_b ‖x_b‖² − ‖x_b‖₁²/d_b  (δ(x) = Σ_b ‖x_b‖₁²/d_b / ‖x‖² ≥ 1/block)
    xd = x.double()
    blk = block or max(d, 1)
    captured = sum(float(xd[s:s + blk].abs().sum()) ** 2 / xd[s:s + blk].numel()
                   for s in range(0, d, blk))
    assert sqnorm(y - xd) == pytest.approx(sqnorm(xd) - captured, rel=1e-5, abs=1e-6 * sqnorm(xd))
    if d and sqnorm(xd):
        assert captured / sqnorm(xd) >= 1 / min(blk, d) * (1 - 1e-9)


@pytest.mark.parametrize("spec", ["sign", "blocksign:block=64", "blocksign:block=5"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_numpy_and_torch_roads_of_the_bit_packing_agree(spec, dtype, monkeypatch):
    from hvdcomp.compressors import bitpack
    c = from_spec(spec)
    x = sample(4099, 6, "sparse", dtype)
    numpy_payload = c.compress(x)
    numpy_decoded = c.decompress(numpy_payload, 4099, dtype)
    monkeypatch.setattr(bitpack, "NUMPY_ON_CPU", False)   # the road CUDA tensors take
    assert torch.equal(c.compress(x), numpy_payload)
    assert torch.equal(c.decompress(numpy_payload, 4099, dtype), numpy_decoded)


def test_sign_of_zero_is_plus_and_zero_input_has_zero_error():
    for c in (from_spec("sign"), from_spec("blocksign:block=4")):
        zeros = torch.zeros(13)
        assert torch.equal(c.decompress(c.compress(zeros), 13), zeros)
        x = torch.tensor([0.0, -0.0, 2.0, -2.0])
        assert c.decompress(c.compress(x), 4).tolist() == [1.0, 1.0, 1.0, -1.0]
    # a zero block decodes to zeros even next to non-zero blocks
    c = from_spec("blocksign:block=4")
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -3.0, 0.0])
    assert c.decompress(c.compress(x), 7).tolist() == pytest.approx(
        [0, 0, 0, 0, 4 / 3, -4 / 3, 4 / 3])


@SETTINGS
@given(d=st.integers(1, 3000), seed=SEEDS, kind=KINDS)
def test_sign_payload_is_the_scale_then_numpy_packbits(d, seed, kind):
    x = sample(d, seed, kind, torch.float32)
    payload = from_spec("sign").compress(x)
    scale = float(x.double().abs().sum()) / d
    assert payload[:4].view(torch.float32).item() == pytest.approx(scale, rel=1e-5)  # fp32 sum
    assert payload[4:].numpy().tobytes() == np.packbits((x >= 0).numpy()).tobytes()


def test_sign_bit_order_by_hand():
    x = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 5.0, -1.0])
    assert from_spec("sign").compress(x)[4:].tolist() == [0b10011100, 0b10000000]


# --- quantization and low rank --------------------------------------------------------------------
@SETTINGS
@given(d=LENGTHS, seed=SEEDS, kind=KINDS, levels=st.sampled_from([1, 2, 3, 4, 7, 8, 64, 127]))
def test_qsgd_is_within_one_level_per_element(d, seed, kind, levels):
    c = from_spec(f"qsgd:levels={levels}")
    x = sample(d, seed, kind)
    y = c.decompress(c.compress(x, seed), d, torch.float64, seed)
    step = math.sqrt(sqnorm(x)) / levels
    assert bool(((y - x).abs() <= step * (1 + 1e-6) + 1e-300).all())
    # decoded values lie on the grid ‖x‖·j/s with sign(x)
    if d and step:
        grid = y / (float(c.compress(x, seed)[:4].view(torch.float32)) / levels)
        assert torch.allclose(grid, grid.round(), atol=1e-6)


def test_qsgd_is_unbiased_and_rescaled_qsgd_contracts():
    d, levels = 400, 2
    x = sample(d, 4, "heavy")
    plain = from_spec(f"qsgd:levels={levels}")
    rescaled = from_spec(f"qsgd:levels={levels},rescale=True")
    omega = min(d / levels ** 2, math.sqrt(d) / levels)
    decoded = [plain.decompress(plain.compress(x, s), d, torch.float64, s) for s in range(300)]
    mean = sum(decoded) / len(decoded)
    spread = math.sqrt(sqnorm(x)) / levels / math.sqrt(len(decoded))  # per-element std bound
    assert bool(((mean - x).abs() <= 6 * spread).all())
    mean_error = sum(sqnorm(y - x) for y in decoded) / len(decoded)
    assert mean_error <= omega * sqnorm(x)
    rescaled_error = sum(error(rescaled, x, s) for s in range(300)) / 300
    assert rescaled_error <= (1 - 1 / (1 + omega)) * sqnorm(x)


@SETTINGS
@given(d=LENGTHS, seed=SEEDS, kind=KINDS, rank=st.sampled_from([1, 2, 4, 64]))
def test_powersgd_is_a_projection(d, seed, kind, rank):
    c = from_spec(f"powersgd:rank={rank}")
    x = sample(d, seed, kind)
    y = c.decompress(c.compress(x, seed), d, torch.float64, seed)
    # C is an orthogonal projection of the padded M: ‖C − M‖² = ‖M‖² − ‖C‖².  Dropping C's
    # entries in the padding only lowers the error further:
    # ‖C[:d] − x‖² = ‖x‖² − ‖C[:d]‖² − 2‖C_pad‖² ≤ ‖x‖² − ‖y‖²  (fp32 factors: 1e-5 slack)
    assert sqnorm(y - x) <= sqnorm(x) - sqnorm(y) + 1e-5 * sqnorm(x) + 1e-20


def test_powersgd_expected_contraction_is_rank_over_columns():
    d, rank = 2500, 2                                      # 50 × 50 matrix
    x = sample(d, 2, "gauss")
    c = from_spec(f"powersgd:rank={rank}")
    mean = sum(error(c, x, s) for s in range(100)) / 100
    assert mean <= (1 - rank / 50) * sqnorm(x)
    # exact for a matrix of rank ≤ r: the power iteration finds its column space
    u, v = torch.randn(50, 2, dtype=torch.float64), torch.randn(2, 50, dtype=torch.float64)
    low_rank = (u @ v).reshape(-1)
    assert error(c, low_rank, 0) <= 1e-10 * sqnorm(low_rank)


# --- payload plumbing -----------------------------------------------------------------------------
@SETTINGS
@given(lengths=st.lists(st.integers(0, 700), min_size=1, max_size=6), seed=SEEDS,
       specs=st.lists(st.sampled_from(SPECS), min_size=6, max_size=6))
def test_packed_payloads_split_back_into_views_and_decode_at_any_offset(lengths, seed, specs):
    chunks = [(from_spec(specs[i]), sample(d, seed + i, "gauss", torch.float32))
              for i, d in enumerate(lengths)]
    payloads = [c.compress(x, seed) for c, x in chunks]
    sizes = [c.payload_nbytes(x.numel()) for c, x in chunks]
    buffer = pack_payloads(payloads)
    parts = split_payloads(buffer, sizes)
    for (c, x), original, part in zip(chunks, payloads, parts):
        assert part.numel() == 0 or (part.untyped_storage().data_ptr()
                                     == buffer.untyped_storage().data_ptr())  # views, no copies
        expected = c.decompress(original, x.numel(), torch.float32, seed)
        assert torch.equal(c.decompress(part, x.numel(), torch.float32, seed), expected)
    with pytest.raises(CompressionError, match="expected"):
        split_payloads(buffer, sizes[:-1] + [sizes[-1] + 1])


@pytest.mark.parametrize("spec", SPECS)
def test_decompress_at_every_misalignment(spec):
    c = from_spec(spec)
    x = sample(777, 1, "gauss", torch.float32)
    payload = c.compress(x, 3)
    expected = c.decompress(payload, 777, torch.float32, 3)
    for shift in range(1, 8):
        buffer = torch.zeros(payload.numel() + shift, dtype=torch.uint8)
        buffer[shift:] = payload
        assert torch.equal(c.decompress(buffer[shift:], 777, torch.float32, 3), expected)


@pytest.mark.parametrize("spec", SPECS)
def test_tensors_that_require_grad_compress_like_plain_ones(spec):
    c = from_spec(spec)
    x = sample(2000, 4, "gauss", torch.float32)
    expected = c.decompress(c.compress(x, 1), 2000, torch.float32, 1)
    leaf = x.clone().requires_grad_(True)
    assert torch.equal(c.decompress(c.compress(leaf, 1), 2000, torch.float32, 1), expected)


@pytest.mark.parametrize("spec", SPECS)
def test_wrong_payloads_and_inputs_are_refused(spec):
    c = from_spec(spec)
    payload = c.compress(sample(100, 0), 0)
    with pytest.raises(CompressionError, match="bytes, expected"):
        c.decompress(torch.cat([payload, payload[:1]]), 100)
    with pytest.raises(CompressionError):
        c.decompress(payload.view(-1, 1) if payload.numel() else payload.float(), 100)
    with pytest.raises(CompressionError, match="float"):
        c.compress(torch.arange(10))


# --- NaN / Inf ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 517, 999])
def test_nonfinite_input_raises(spec, bad, where):
    x = sample(1000, 2)
    x[where] = bad
    with pytest.raises(CompressionError, match="NaN or Inf"):
        from_spec(spec).compress(x, 1)


def test_finite_check_modes():
    x = torch.tensor([1.0, float("nan"), 2.0])
    c = from_spec("sign")
    old = compressor_base.set_finite_check("off")
    try:
        c.compress(x)                                   # the user asked for no check
        compressor_base.set_finite_check("deferred")    # CPU tensors are still checked at once
        with pytest.raises(CompressionError):
            c.compress(x)
        compressor_base.raise_if_nonfinite()            # nothing deferred on CPU
    finally:
        compressor_base.set_finite_check(old)
    with pytest.raises(ValueError, match="finite check mode"):
        compressor_base.set_finite_check("sometimes")


# --- parameters and specs -------------------------------------------------------------------------
@pytest.mark.parametrize("spec, parameter", [
    ("topk:ratio=0", "ratio"), ("topk:ratio=1.5", "ratio"), ("topk:ratio=-0.1", "ratio"),
    ("topk:fp16_values=2", "fp16_values"), ("randomk:ratio=2", "ratio"),
    ("randomk:seed=-1", "seed"), ("randomk:seed=1.5", "seed"), ("blocksign:block=0", "block"),
    ("blocksign:block=2.5", "block"), ("dgc:ratio=0", "ratio"),
    ("dgc:sample_ratio=1.1", "sample_ratio"),
    ("qsgd:levels=0", "levels"), ("qsgd:levels=128", "levels"), ("qsgd:rescale=yes", "rescale"),
    ("powersgd:rank=0", "rank"), ("topk:ratio=0.1,colour=3", "colour"), ("nosuch", "unknown"),
])
def test_bad_parameters_name_the_parameter(spec, parameter):
    with pytest.raises(ValueError, match=parameter):
        from_spec(spec)


@pytest.mark.parametrize("spec", SPECS + ["topk", "randomk", "blocksign",
                                          "dgc:ratio=0.3,sample_ratio=0.5",
                                          "qsgd", "powersgd", "topk:ratio=1"])
def test_spec_round_trips(spec):
    c = from_spec(spec)
    again = from_spec(c.spec())
    assert type(again) is type(c) and again.config() == c.config()
    assert again.spec() == c.spec()


# --- documented valid values of every parameter (issue 14) ----------------------------------------
NUMBER_IN_0_1 = (["1e-9", "0.5", "1"], ["0", "-0.1", "1.0001", "nan", "inf", "x", "true"])
#: compressor -> parameter -> (valid range as docs/algorithms.md words it, accepted, rejected)
DOCUMENTED_RANGES = {
    "topk": {"ratio": ("a number in (0, 1]", *NUMBER_IN_0_1),
             "fp16_values": ("true or false", ["true", "false"], ["1", "yes"])},
    "randomk": {"ratio": ("a number in (0, 1]", *NUMBER_IN_0_1),
                "seed": ("an integer in [0, 2^63 - 1]", ["0", str(2**63 - 1)],
                         ["-1", str(2**63), "1.5"])},
    "dgc": {"ratio": ("a number in (0, 1]", *NUMBER_IN_0_1),
            "sample_ratio": ("a number in (0, 1]", *NUMBER_IN_0_1)},
    "blocksign": {"block": ("an integer in [1, 2^31 - 1]", ["1", str(2**31 - 1)],
                            ["0", "-3", str(2**31), "2.5", "true"])},
    "qsgd": {"levels": ("an integer in [1, 127]", ["1", "127"], ["0", "128", "2.5", "-1"]),
             "rescale": ("true or false", ["true", "false"], ["yes", "1"])},
    "powersgd": {"rank": ("an integer in [1, 65536]", ["1", "65536"], ["0", "65537", "1.5"])},
}
CASES = [(name, parameter, *spec) for name, table in DOCUMENTED_RANGES.items()
         for parameter, spec in table.items()]


def test_every_parameter_of_every_compressor_has_a_documented_range():
    import inspect
    from hvdcomp.compressors.registry import registered_names
    docs = (REPO / "docs" / "algorithms.md").read_text()
    for name in registered_names():
        cls = REGISTRY[name]
        signature = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                     if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        assert cls.parameters is not None, f"{name} declares no parameter ranges"
        assert sorted(cls.parameters) == sorted(signature), name
        assert {k: v for k, v in cls.parameters.items()} == {
            k: v[0] for k, v in DOCUMENTED_RANGES.get(name, {}).items()}, name
        for parameter, valid in cls.parameters.items():
            assert f"| `{name}` | `{parameter}` | {valid} |" in docs, (name, parameter)


@pytest.mark.parametrize("name, parameter, valid, accepted, rejected", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_values_outside_the_documented_range_are_refused_naming_it(name, parameter, valid,
                                                                  accepted, rejected):
    from hvdcomp.compressors.registry import CompressorSpecError
    for value in accepted:
        from_spec(f"{name}:{parameter}={value}")
    for value in rejected:
        with pytest.raises(CompressorSpecError) as info:
            from_spec(f"{name}:{parameter}={value}")
        message = str(info.value)
        assert message.startswith(f"{name}: {parameter} must be {valid}"), message
        assert isinstance(info.value, ValueError)   # callers catching ValueError still do


@pytest.mark.parametrize("spec, message", [
    ("topk:colour=3", "topk: unknown parameter 'colour'; topk takes ratio (a number in (0, 1], "
                      "default 0.01), fp16_values (true or false, default false)"),
    ("sign:block=4", "sign: unknown parameter 'block'; sign takes no parameters"),
    ("none:x=1", "none: unknown parameter 'x'; none takes no parameters"),
    ("topk:ratio=0.1,ratio=0.2", "topk: ratio is given twice in 'topk:ratio=0.1,ratio=0.2'"),
    ("topk:0.1", "topk: expected key=value, got '0.1'"),
])
def test_spec_mistakes_name_the_valid_parameters(spec, message):
    with pytest.raises(ValueError) as info:
        from_spec(spec)
    assert str(info.value).startswith(message)


def test_a_tiny_ratio_still_sends_one_element():
    for spec in ("topk:ratio=1e-12", "randomk:ratio=1e-12", "dgc:ratio=1e-12"):
        c = from_spec(spec)
        x = sample(1000, 3)
        payload = c.compress(x.float(), 5)
        assert payload.numel() == c.payload_nbytes(1000) > 0
        assert int((c.decompress(payload, 1000, torch.float32, 5) != 0).sum()) == 1


def test_error_feedback_refuses_qsgd_without_rescale_psgd_takes_it():
    """Without rescale QSGD's error exceeds ‖x‖ on chunks of levels² elements or more (here
    measured on one chunk of 4096), which error feedback amplifies: algorithms refuse it."""
    from hvdcomp.algorithms import make_algorithm
    x = sample(4096, 1).float()
    for levels in (1, 4):
        plain = from_spec(f"qsgd:levels={levels}")
        assert sqnorm(plain.roundtrip(x, 3)[1].double() - x.double()) > sqnorm(x)  # no contraction
        for algorithm in ("liec", "memsgd", "doublesqueeze", "ef21"):
            with pytest.raises(ValueError, match=rf"use qsgd:levels={levels},rescale=true"):
                make_algorithm(algorithm, up=f"qsgd:levels={levels}")
            make_algorithm(algorithm, up=f"qsgd:levels={levels},rescale=true")
        make_algorithm("psgd", up=f"qsgd:levels={levels}")


# --- CUDA: tests/test_gpu_compressors.py (marker gpu) ---------------------------------------------


# --- the benchmark's library and CLI (structure only: no timing assertions) -----------------------
def test_bench_spec_list_and_sizes_parse():
    from hvdcomp.bench.compressors import parse_sizes, parse_spec_list
    assert parse_spec_list("sign, topk:ratio=0.01,fp16_values=true,blocksign:block=64,none") == [
        "sign", "topk:ratio=0.01,fp16_values=true", "blocksign:block=64", "none"]
    assert parse_sizes("1, 16,64") == [1.0, 16.0, 64.0]
    for bad in ("0", "-1", "x", ""):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_bench_records_match_the_payload_formula():
    from hvdcomp.bench.compressors import bench_compressors
    results = bench_compressors(["sign", "topk:ratio=0.01"], [0.01], warmup=0, repeats=1)
    assert [r.compressor for r in results] == ["sign", "topk:fp16_values=False,ratio=0.01"]
    for r in results:
        assert r.numel == int(0.01 * 2 ** 20) // 4
        assert r.bits_per_element == r.formula_bits_per_element
        assert r.bits_per_element == 8 * expected_nbytes(r.compressor, r.numel) / r.numel
        assert min(r.compress_gbps, r.decompress_gbps, r.memcpy_gbps, r.roundtrip_vs_memcpy) > 0


def test_bench_cli_refuses_bad_options_with_exit_code_2():
    from click.testing import CliRunner
    from hvdcomp.cli.main import cli
    runner = CliRunner()
    for args in (["compressors", "--sizes", "0"], ["compressors", "--compressors", "topk:ratio=2"],
                 ["compressors", "--compressors", "nosuch"]):
        result = runner.invoke(cli, ["bench", *args])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("Error: --") and len(result.stderr.splitlines()) == 1
    result = runner.invoke(cli, ["bench", "compressors", "--sizes", "0.01", "--repeats", "1",
                                 "--compressors", "sign", "--json"])
    assert result.exit_code == 0, result.output
    import json
    record = json.loads(result.output)
    assert record["results"][0]["compressor"] == "sign" and "cpu" in record["machine"]
