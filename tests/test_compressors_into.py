"""decompress_into / roundtrip_into: the exchange decodes straight into slices of reused buffers;
the values must be those of decompress / roundtrip, bit for bit, whatever the slice or offset."""
import pytest
import torch

from hvdcomp.compressors import from_spec

SPECS = ["none", "fp16", "bf16", "sign", "blocksign:block=64", "blocksign:block=7",
         "topk:ratio=0.1", "randomk:ratio=0.2", "dgc:ratio=0.05", "qsgd:levels=4",
         "powersgd:rank=2"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("numel", [1, 13, 64, 301])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decompress_into_a_slice_equals_decompress(spec, numel, dtype):
    compressor = from_spec(spec)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel), dtype=dtype)
    x[numel // 2] = 0.0      # a zero element (sign's bit for 0)
    payload = compressor.compress(x, seed=5)
    # the payload placed at an odd byte offset of a bigger buffer, as after an alltoall
    packed = torch.cat([torch.zeros(3, dtype=torch.uint8), payload])[3:]
    want = compressor.decompress(payload, numel, dtype, seed=5)
    bucket = torch.full((numel + 10,), float("nan"), dtype=dtype)
    got = compressor.decompress_into(packed, bucket[4:4 + numel], seed=5)
    assert got.data_ptr() == bucket[4:].data_ptr()
    assert torch.equal(bucket[4:4 + numel], want)
    assert torch.isnan(bucket[:4]).all() and torch.isnan(bucket[4 + numel:]).all()  # untouched


@pytest.mark.parametrize("spec", SPECS)
def test_roundtrip_into_equals_roundtrip(spec):
    compressor = from_spec(spec)
    x = torch.randn(200, generator=torch.Generator().manual_seed(1))
    payload, decoded = compressor.roundtrip(x, seed=2)
    out = torch.empty(200)
    payload_into = compressor.roundtrip_into(x, out, seed=2)
    assert torch.equal(payload_into, payload)
    assert torch.equal(out, decoded)


def test_sign_decodes_minus_zero_and_zero_alike():
    compressor = from_spec("sign")
    x = torch.tensor([0.0, -0.0, 1.0, -3.0])
    out = torch.empty(4)
    compressor.decompress_into(compressor.compress(x), out)
    scale = x.abs().sum() / 4
    assert torch.equal(out, torch.where(x >= 0, scale, -scale))
