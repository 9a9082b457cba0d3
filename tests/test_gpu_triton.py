"""The Triton road of sign packing and decoding (hvdcomp/compressors/_triton.py) against the
reference roads of bitpack, bit for bit. On a GPU the gpu-marked compressor tests cover it (CUDA
against CPU); here the kernels run in Triton's interpreter on CPU tensors, in a subprocess
(``TRITON_INTERPRET`` must be set before Triton is imported). Skips where Triton is missing (the
CPU-only PyTorch wheel does not bring it)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import torch
    from hvdcomp.compressors import _triton, bitpack
    bitpack.NUMPY_ON_CPU = False          # the torch reference road
    generator = torch.Generator().manual_seed(0)
    for numel in (1, 7, 8, 9, 4095, 4096, 4097, 100003):
        x = torch.randn(numel, generator=generator)
        x[::5] = 0.0                       # sign(0) = +1, as the reference
        x[3::11] = -0.0
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            xd = x.to(dtype)
            want = torch.empty(bitpack.packed_nbytes(numel), dtype=torch.uint8)
            flags = bitpack.flag_buffer(numel, xd.device)
            torch.ge(xd, 0, out=flags[:numel])
            bitpack.pack_flag_buffer(flags, want)
            if dtype != torch.bfloat16:   # the interpreter loads bfloat16 as raw uint16
                got = torch.full_like(want, 0xAB)
                _triton.sign_pack(xd, got)
                assert torch.equal(got, want), (numel, dtype)
            for scale in (None, torch.tensor(0.3712, dtype=torch.float32)):
                table = bitpack._scaled_sign_table(xd.device, dtype, scale)
                index = want.to(torch.int64)
                expected = table[index].reshape(-1)[:numel]
                out = torch.full((numel,), 7.0, dtype=dtype)
                _triton.sign_decode(want, numel, scale, out)
                assert torch.equal(out, expected), (numel, dtype, scale)
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_sign_kernels_equal_the_reference_bit_for_bit():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_the_triton_setting_is_checked(monkeypatch):
    from hvdcomp.compressors import _triton
    from hvdcomp.compressors.base import CompressionError
    monkeypatch.setenv("HVDCOMP_TRITON", "sometimes")
    with pytest.raises(CompressionError, match="HVDCOMP_TRITON"):
        _triton.setting()
    monkeypatch.setenv("HVDCOMP_TRITON", "0")
    assert _triton.setting() == "off"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_triton_sign_road_on_cuda_equals_the_cpu_reference(dtype):
    import torch

    from hvdcomp.compressors import _triton, bitpack
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not _triton.usable(torch.empty(1, device="cuda")):
        pytest.skip("Triton road not selected (HVDCOMP_TRITON=0 or no Triton)")
    dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(1)
    for numel in (1, 9, 4097, 1 << 20):
        x = torch.randn(numel, generator=generator).to(dtype)
        x[::7] = 0.0
        want = torch.empty(bitpack.packed_nbytes(numel), dtype=torch.uint8)
        bitpack.pack_signs(x, want)
        got = torch.empty_like(want, device="cuda")
        bitpack.pack_signs(x.cuda(), got)
        assert torch.equal(got.cpu(), want)
        scale = torch.tensor(0.3712)
        expected = bitpack.unpack_signs(want, numel, dtype, scale)
        decoded = bitpack.unpack_signs(got, numel, dtype, scale.cuda())
        assert torch.equal(decoded.cpu(), expected)
