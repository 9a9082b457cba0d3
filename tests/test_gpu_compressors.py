"""Compressors on a CUDA device (marker ``gpu``; skipped without one; scripts/gpu-check.sh runs
them): the same values as on the CPU where the computation allows it, the same draws on every
rank where it is random, and not one host synchronisation in any of the calls the exchange makes.

What "the same as on the CPU" can mean, by compressor:

* ``none``, ``fp16``, ``bf16``, ``topk``, ``dgc``: elementwise casts and selections by comparison
  -- the decoded tensor equals the CPU's bit for bit (Gaussian data: no ties at the threshold);
* ``sign``, ``blocksign``: the scale is a float sum (an L1 norm, block means), which a GPU adds
  in another order than the CPU, so it may differ in its last bits; the signs are the same;
* ``randomk``, ``qsgd``, ``powersgd``: they draw from a generator on the tensor's device, and
  torch's CPU and CUDA generators give different streams for one seed. What ranks need is that
  every rank draws the same for the same seed, which is checked on the device; the CPU result
  is not a reference for them.
"""
from __future__ import annotations

import pytest
import torch

from hvdcomp.compressors import CompressionError, from_spec
from hvdcomp.compressors import base as compressor_base

from gpu_support import (GPU_MARKS, deferred_finite_check, first_difference, no_host_sync,
                         same_bits)

pytestmark = GPU_MARKS

EXACT = ["none", "fp16", "bf16", "topk:ratio=0.1", "topk:fp16_values=True,ratio=0.05",
         "dgc:ratio=0.01"]
SUMMED_SCALE = ["sign", "blocksign:block=64", "blocksign:block=7"]
RANDOM = ["randomk:ratio=0.1,seed=7", "qsgd:levels=4", "qsgd:levels=1,rescale=True",
          "powersgd:rank=2"]
ALL = EXACT + SUMMED_SCALE + RANDOM
#: odd sizes: a short last byte of sign bits, a short last block, a chunk that no power of two
#: divides
SIZES = [100_003, 1 << 20]


def gaussian(numel: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=gen, dtype=torch.float32)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("spec", EXACT)
@deferred_finite_check()
def test_deterministic_compressors_decode_as_on_the_cpu_bit_for_bit(spec, numel):
    c = from_spec(spec)
    x = gaussian(numel, 5)
    on_cpu = c.decompress(c.compress(x, 9), numel, torch.float32, 9)
    payload = c.compress(x.cuda(), 9)
    on_gpu = c.decompress(payload, numel, torch.float32, 9)
    assert payload.is_cuda and on_gpu.is_cuda
    assert payload.dtype == torch.uint8 and payload.numel() == c.payload_nbytes(numel)
    assert same_bits(on_gpu, on_cpu), f"{spec}: {first_difference(on_gpu, on_cpu)}"
    if c.name in ("none", "fp16", "bf16"):   # no selection order in the payload: the same bytes
        assert same_bits(payload, c.compress(x, 9))


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("spec", SUMMED_SCALE)
@deferred_finite_check()
def test_sign_compressors_match_the_cpu_up_to_the_order_of_the_scale_sum(spec, numel):
    c = from_spec(spec)
    x = gaussian(numel, 6)
    on_cpu = c.decompress(c.compress(x, 9), numel, torch.float32, 9)
    on_gpu = c.decompress(c.compress(x.cuda(), 9), numel, torch.float32, 9).cpu()
    assert torch.equal(torch.signbit(on_gpu), torch.signbit(on_cpu))
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=0)


@pytest.mark.parametrize("spec", RANDOM)
@deferred_finite_check()
def test_random_compressors_draw_the_same_on_every_call_with_one_seed(spec):
    """Every rank decodes a payload with the seed it was made with: the draws must depend on the
    seed alone (not on the generator's history), and the result must still approximate x."""
    c = from_spec(spec)
    numel = 100_003
    x = gaussian(numel, 7).cuda()
    first, again = c.compress(x, 11), c.compress(x, 11)
    assert same_bits(first, again), f"{spec}: two calls with seed 11 differ"
    y = c.decompress(first, numel, torch.float32, 11)
    assert same_bits(y, c.decompress(again, numel, torch.float32, 11))
    assert bool(torch.isfinite(y).all())
    error, norm = (y.double() - x.double()).square().sum(), x.double().square().sum()
    if c.contraction_problem() is None:      # qsgd without rescale is not a contraction
        assert float(error) < float(norm), f"{spec}: ||C(x) - x||^2 >= ||x||^2"


@pytest.mark.parametrize("spec", ALL)
@deferred_finite_check()
def test_compress_and_decompress_never_wait_for_the_device(spec):
    """Each call the exchange makes, inside a region where any host synchronisation raises."""
    c = from_spec(spec)
    numel = 100_003
    x = gaussian(numel, 8).cuda()
    out = torch.empty_like(x)
    c.compress(x, 3)                         # first call: kernels load, caches fill
    with no_host_sync():
        payload = c.compress(x, 3)
        decoded = c.decompress(payload, numel, torch.float32, 3)
        c.decompress_into(payload, out, 3)
        sent, also_decoded = c.roundtrip(x, 3)
        c.roundtrip_into(x, torch.empty_like(x), 3)
    assert all(t.is_cuda for t in (payload, decoded, sent, also_decoded))


@pytest.mark.parametrize("spec", ALL)
@deferred_finite_check()
def test_every_form_decodes_what_decompress_decodes_on_the_gpu(spec):
    """The exchange decodes into reused buffers (``decompress_into``) and keeps the sender's C(x)
    from ``roundtrip``/``roundtrip_into`` for error feedback: all of them must be what every
    receiver's ``decompress`` gives, bit for bit, or the error feedback drifts."""
    c = from_spec(spec)
    numel = 100_003
    x = gaussian(numel, 8).cuda()
    payload = c.compress(x, 3)
    decoded = c.decompress(payload, numel, torch.float32, 3)
    out = torch.full_like(x, float("nan"))
    c.decompress_into(payload, out, 3)
    sent, sender_view = c.roundtrip(x, 3)
    into = torch.full_like(x, float("nan"))
    sent_into = c.roundtrip_into(x, into, 3)
    assert same_bits(out, decoded), f"decompress_into: {first_difference(out, decoded)}"
    assert same_bits(sent, payload) and same_bits(sent_into, payload)
    assert same_bits(sender_view, decoded), f"roundtrip: {first_difference(sender_view, decoded)}"
    assert same_bits(into, decoded), f"roundtrip_into: {first_difference(into, decoded)}"


@pytest.mark.parametrize("spec", ["none", "fp16", "sign", "topk:ratio=0.1"])
@deferred_finite_check()
def test_deferred_finite_check_still_refuses_nan_on_the_gpu(spec):
    """Deferred means later, not never: the count kept on the device raises at the next
    ``raise_if_nonfinite`` (once per step, where the caller reads it)."""
    c = from_spec(spec)
    x = gaussian(4099, 9).cuda()
    x[17] = float("nan")
    with no_host_sync():
        c.compress(x, 1)
    with pytest.raises(CompressionError):
        compressor_base.raise_if_nonfinite()



def test_horovod_random_k_draws_the_cpus_indices_without_waiting():
    """``hvdcomp.Compression.randomk`` (Horovod's compressor interface): the indices come from a
    CPU generator, so every rank, CPU or GPU, draws the same; they reach the GPU from pinned
    memory without blocking."""
    from hvdcomp.compression import Compression
    x = gaussian(98_000, 12).reshape(7, -1)
    xc = x.cuda()
    on_cpu, on_gpu = Compression.randomk(0.1, seed=3), Compression.randomk(0.1, seed=3)
    on_cpu.compress(x)                        # the n-th call draws the n-th indices
    on_gpu.compress(xc)                       # first call: pinned memory, kernels
    sent_cpu, ctx_cpu = on_cpu.compress(x)
    with no_host_sync():
        sent, ctx = on_gpu.compress(xc)
        decoded = on_gpu.decompress(sent, ctx)
    assert sent.is_cuda and same_bits(sent, sent_cpu)
    assert same_bits(decoded, on_cpu.decompress(sent_cpu, ctx_cpu))
