"""The compressors' CPU fast path (C kernels, hvdcomp/compressors/_native.py) against the
pure-torch reference, bit for bit: the same payload bytes and the same decoded tensors over many
shapes (lengths that are not multiples of 8, of the kernels' piece size, or of a block), value
kinds (zeros and -0.0, subnormals, huge values, NaN/Inf with the check off) and thread counts;
and ``HVDCOMP_NATIVE`` (off, required, no compiler) doing what docs say.

The L1 norm both roads compute is also checked against an independent oracle: the exact sum of
the float32 values (Python fractions), rounded once to the nearest float32.
"""
from __future__ import annotations

import contextlib
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hvdcomp.compressors import CompressionError, _native, from_spec
from hvdcomp.compressors import base as compressor_base
from hvdcomp.compressors.l1norm import l1_norm

SETTINGS = settings(max_examples=60, deadline=None)
SIGN_SPECS = ["sign", "chunksign", "blocksign:block=64", "blocksign:block=7"]
#: the comparisons need the kernels; the HVDCOMP_NATIVE tests below run without a compiler too
needs_kernels = pytest.mark.skipif(_native.library() is None,
                                   reason=f"C kernels unavailable: {_native.status()}")


@contextlib.contextmanager
def road(name: str):
    """Run the block on the ``native`` road or the ``reference`` one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HVDCOMP_NATIVE", "1" if name == "native" else "0")
        yield


def vector(numel: int, seed: int, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen)
    if kind == "wide":       # exponents from subnormal to 1e30: every bin of the L1 sum
        scales = torch.pow(10.0, torch.randint(-44, 31, (numel,), generator=gen).double())
        x = (x.double() * scales).float()
    elif kind == "zeros":    # exact zeros of both signs (sign bit: x >= 0, so -0.0 sends 1)
        x = torch.where(torch.rand(numel, generator=gen) < 0.5, 0.0, x)
        x[::3] = -0.0
    elif kind == "constant":
        x = torch.full((numel,), -0.75)
    elif kind == "huge":     # exponents around 229, where a block's upper bin is lo + 26
        x = x * 2.0 ** 100
    elif kind == "span":     # blocks whose exponents span 22..25 binades (the C kernel's limit)
        spans = torch.randint(22, 26, (numel,), generator=gen).float()
        x = torch.where(torch.arange(numel) % 2 == 0, x, x * torch.pow(2.0, -spans))
    return x


KINDS = st.sampled_from(["gauss", "wide", "zeros", "constant", "huge", "span"])
# lengths around multiples of 8 and of the kernels' per-thread pieces (2^18 elements)
LENGTHS = st.one_of(st.integers(0, 2100), st.integers((1 << 19) - 9, (1 << 19) + 9))


def both_roads(spec: str, x: torch.Tensor, seed: int = 3):
    results = {}
    for name in ("reference", "native"):
        with road(name):
            compressor = from_spec(spec)
            payload = compressor.compress(x, seed)
            out = torch.full_like(x, float("nan"))
            compressor.decompress_into(payload, out, seed)
            results[name] = (payload, compressor.decompress(payload, x.numel(), x.dtype, seed),
                             out)
    return results["reference"], results["native"]


@needs_kernels
@SETTINGS
@given(numel=LENGTHS, seed=st.integers(0, 2 ** 31 - 1), kind=KINDS,
       spec=st.sampled_from(SIGN_SPECS), threads=st.sampled_from([1, 2, 3]))
def test_sign_family_native_equals_reference(numel, seed, kind, spec, threads):
    x = vector(numel, seed, kind)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (ref_payload, ref_fresh, ref_into), (payload, fresh, into) = both_roads(spec, x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(payload, ref_payload)
    assert torch.equal(fresh, ref_fresh) and torch.equal(into, ref_into)
    assert torch.equal(fresh, into)


@needs_kernels
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 63, 65, 1000, (1 << 18) + 5])
def test_sign_with_bucket_norm_and_partial_norm_native_equal_reference(numel):
    x = vector(numel, numel, "wide")
    sign = from_spec("sign")
    got = {}
    for name in ("reference", "native"):
        with road(name):
            norm = sign.partial_norm(x)
            got[name] = (norm, sign.compress(x[: numel // 2 + 1], bucket=(norm, numel)))
    assert torch.equal(got["native"][0], got["reference"][0])
    assert torch.equal(got["native"][1], got["reference"][1])


@needs_kernels
@settings(max_examples=30, deadline=None)
@given(numel=LENGTHS, seed=st.integers(0, 2 ** 31 - 1),
       kind=st.sampled_from(["gauss", "zeros", "constant", "span"]),   # qsgd's L2 norm is finite
       spec=st.sampled_from(["sign", "chunksign", "qsgd:levels=4"]),
       threads=st.sampled_from([1, 2, 3]))
def test_decompress_add_into_equals_decode_then_add(numel, seed, kind, spec, threads):
    """The server's fused decode-and-add (sign's C kernel; the default elsewhere) gives the
    float sums of decoding into a scratch buffer and adding, bit for bit, on both roads."""
    x, addend = vector(numel, seed, kind), vector(numel, seed + 1, "gauss")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in ("reference", "native"):
            with road(name):
                compressor = from_spec(spec)
                payload = compressor.compress(x, 5)
                decoded = compressor.decompress(payload, numel, seed=5)
                want = addend.clone().add_(decoded)
                got = addend.clone()
                scratch = torch.full_like(x, float("nan"))
                assert compressor.decompress_add_into(payload, got, scratch, 5) is got
                assert torch.equal(got, want), name
                for n in (2, 3, 7):       # the average's 1/N product in the same pass
                    got = addend.clone()
                    compressor.decompress_add_into(payload, got, scratch, 5, scale=1.0 / n)
                    assert torch.equal(got, addend.clone().add_(decoded).mul_(1.0 / n)), (name, n)
    finally:
        torch.set_num_threads(old)


_MAPPED_GOMPS = """
import os, torch
from hvdcomp.compressors import _native, from_spec
from_spec("sign").compress(torch.randn(1 << 20))
assert _native.library() is not None, _native.status()
with open("/proc/self/maps") as maps:
    print(sorted({line.split()[-1] for line in maps if "libgomp" in line}))
print(_native._openmp_flags())
"""


@needs_kernels
def test_kernels_run_on_torchs_own_openmp_runtime():
    """No second OpenMP runtime: a fresh process that imports torch and runs the kernels maps
    one libgomp (torch's), and the library was built for it exactly when torch's is loaded.
    (A fresh process: other tests' imports, e.g. scikit-learn, bring vendored copies of their
    own under other sonames.)"""
    import ast
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _MAPPED_GOMPS], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    gomps, flags = (ast.literal_eval(line) for line in done.stdout.splitlines()[-2:])
    assert len(gomps) <= 1, gomps
    assert ("-fopenmp" in flags) == (len(gomps) == 1)


def test_kernels_work_in_a_forked_child_with_one_thread():
    """After a fork, with torch.set_num_threads(1) (as DataLoader workers do), the kernels run
    on the calling thread and give the parent's bytes (GNU OpenMP's pool does not survive a
    fork; a region of one thread never touches it)."""
    import multiprocessing
    x = vector(1 << 20, 0, "gauss")
    parent = from_spec("sign").compress(x)
    context = multiprocessing.get_context("fork")
    with context.Pool(1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        child = pool.apply_async(_compress_sign, (x,)).get(timeout=60)
    assert torch.equal(child, parent)


def _compress_sign(x: torch.Tensor) -> torch.Tensor:
    return from_spec("sign").compress(x)


def exact_float32_l1(x: torch.Tensor) -> float:
    """The exact Σ|x_i| (fractions) rounded to the nearest float32, ties to the even one: the
    float32 candidates around float64(sum) compared with the exact sum."""
    total = sum((Fraction(float(v)) for v in np.abs(x.numpy().astype(np.float64))), Fraction(0))
    guess = np.float32(float(total))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess,
                  np.nextafter(guess, np.float32(np.inf))]
    distance = [abs(Fraction(float(c)) - total) for c in candidates if np.isfinite(c)]
    finite = [c for c in candidates if np.isfinite(c)]
    best = min(distance)
    nearest = [c for c, d in zip(finite, distance) if d == best]
    even = [c for c in nearest if not int(np.float32(c).view(np.uint32)) & 1]
    return float((even or nearest)[0])


@needs_kernels
@settings(max_examples=25, deadline=None)
@given(numel=st.integers(1, 3000), seed=st.integers(0, 2 ** 31 - 1), kind=KINDS)
def test_l1_norm_is_the_exact_sum_rounded_once(numel, seed, kind):
    x = vector(numel, seed, kind)
    want = exact_float32_l1(x)
    for name in ("reference", "native"):
        with road(name):
            assert float(l1_norm(x)) == want, name


@needs_kernels
def test_l1_norm_of_half_inputs_is_that_of_their_float32_values():
    x = vector(1001, 5, "gauss")
    for dtype in (torch.float16, torch.bfloat16):
        for name in ("reference", "native"):
            with road(name):
                assert torch.equal(l1_norm(x.to(dtype)), l1_norm(x.to(dtype).float()))


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", SIGN_SPECS)
def test_nonfinite_with_check_off_same_bytes_and_refused_with_check_on(spec, bad):
    x = vector(1003, 1, "gauss")
    x[500] = bad
    old = compressor_base.set_finite_check("off")
    try:
        (ref_payload, _, _), (payload, _, _) = both_roads(spec, x)
    finally:
        compressor_base.set_finite_check(old)
    assert torch.equal(payload, ref_payload)
    for name in ("reference", "native"):
        with road(name), pytest.raises(CompressionError, match="NaN or Inf"):
            from_spec(spec).compress(x)


# --- HVDCOMP_NATIVE ------------------------------------------------------------------------------
@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A library state that must be built again, in an empty cache; restored afterwards."""
    monkeypatch.setenv("HVDCOMP_CACHE_DIR", str(tmp_path))
    _native.reset()
    yield monkeypatch
    _native.reset()


def test_no_compiler_auto_takes_the_reference_and_says_why(fresh_library):
    fresh_library.delenv("CC", raising=False)
    fresh_library.setenv("PATH", "/nonexistent")
    fresh_library.setenv("HVDCOMP_NATIVE", "auto")
    assert _native.library() is None
    assert _native.status() == "reference (no C compiler (gcc/cc) on PATH)"
    x = vector(1001, 2, "wide")
    payload = from_spec("sign").compress(x)       # still works, on the reference road
    fresh_library.setenv("HVDCOMP_NATIVE", "0")
    assert torch.equal(payload, from_spec("sign").compress(x))


def test_native_required_without_a_compiler_is_one_clear_error(fresh_library):
    fresh_library.setenv("CC", "/nonexistent/gcc")
    fresh_library.setenv("HVDCOMP_NATIVE", "1")
    with pytest.raises(CompressionError,
                       match="HVDCOMP_NATIVE=1 but the compressors' C kernels"):
        from_spec("sign").compress(torch.ones(16))


def test_native_off_never_builds(fresh_library, tmp_path):
    fresh_library.setenv("HVDCOMP_NATIVE", "off")
    from_spec("sign").compress(torch.ones(16))
    assert _native.library() is None and _native.status() == "reference (HVDCOMP_NATIVE=0)"
    assert not (tmp_path / "native").exists()


def test_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv("HVDCOMP_NATIVE", "maybe")
    with pytest.raises(CompressionError, match="HVDCOMP_NATIVE must be auto, 0/off or 1/on"):
        from_spec("sign").compress(torch.ones(16))


@needs_kernels
def test_build_lands_in_the_cache_and_is_reused(fresh_library, tmp_path):
    fresh_library.setenv("HVDCOMP_NATIVE", "1")
    assert _native.library() is not None
    built = list((tmp_path / "native").glob("kernels-*.so"))
    assert len(built) == 1
    _native.reset()
    fresh_library.setenv("CC", "/nonexistent/gcc")   # a cache hit needs no compiler
    assert _native.library() is not None


# --- top-k: candidates and max|x| in one C pass ---------------------------------------------------
@needs_kernels
@settings(max_examples=30, deadline=None)
@given(numel=st.integers(1 << 14, 1 << 17), seed=st.integers(0, 2 ** 31 - 1),
       kind=st.sampled_from(["gauss", "wide", "zeros", "constant", "ties"]),
       ratio=st.sampled_from([0.001, 0.01, 0.05, 0.125]))
def test_topk_native_equals_reference(numel, seed, kind, ratio):
    if kind == "ties":        # few distinct magnitudes: ties at the k-th largest
        x = torch.randint(-3, 4, (numel,), generator=torch.Generator().manual_seed(seed)).float()
    else:
        x = vector(numel, seed, kind)
    (ref_payload, ref_fresh, ref_into), (payload, fresh, into) = both_roads(
        f"topk:ratio={ratio}", x)
    assert torch.equal(payload, ref_payload)
    assert torch.equal(fresh, ref_fresh) and torch.equal(into, ref_into)


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_topk_nonfinite_same_bytes_with_check_off_refused_with_check_on(bad):
    x = vector(1 << 15, 4, "gauss")
    x[123] = bad
    old = compressor_base.set_finite_check("off")
    try:
        (ref_payload, _, _), (payload, _, _) = both_roads("topk:ratio=0.01", x)
    finally:
        compressor_base.set_finite_check(old)
    assert torch.equal(payload, ref_payload)
    for name in ("reference", "native"):
        with road(name), pytest.raises(CompressionError, match="NaN or Inf"):
            from_spec("topk:ratio=0.01").compress(x)


# --- qsgd: codes and decode in one C pass each ----------------------------------------------------
@needs_kernels
@settings(max_examples=40, deadline=None)
@given(numel=LENGTHS, seed=st.integers(0, 2 ** 31 - 1),
       kind=st.sampled_from(["gauss", "zeros", "constant"]),   # "wide" overflows the L2 norm
       levels=st.sampled_from([1, 2, 4, 7, 16, 127]), rescale=st.booleans(),
       threads=st.sampled_from([1, 2, 3]))
def test_qsgd_native_equals_reference(numel, seed, kind, levels, rescale, threads):
    x = vector(numel, seed, kind)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (ref_payload, ref_fresh, ref_into), (payload, fresh, into) = both_roads(
            f"qsgd:levels={levels},rescale={rescale}", x, seed=seed)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(payload, ref_payload)
    assert torch.equal(fresh, ref_fresh) and torch.equal(into, ref_into)


def test_counter_uniforms_are_uniform_and_independent_of_the_piece():
    from hvdcomp.compressors.quantize import counter_uniforms
    u = counter_uniforms(1 << 20, 5, "cpu", torch.float64)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    # mean 1/2 and variance 1/12 within 6 standard errors of 2^20 draws
    assert abs(float(u.mean()) - 0.5) < 6 * (1 / 12) ** 0.5 / 2 ** 10
    assert abs(float(u.var()) - 1 / 12) < 6 * (1 / 180) ** 0.5 / 2 ** 10
    # neighbouring elements uncorrelated; another seed gives other draws
    assert abs(float(torch.corrcoef(torch.stack([u[1:], u[:-1]]))[0, 1])) < 6 / 2 ** 10
    assert not torch.equal(u, counter_uniforms(1 << 20, 6, "cpu", torch.float64))


# --- the finite check of the casts: a C scan instead of torch.isfinite(x).all() ------------------
@needs_kernels
@settings(max_examples=40, deadline=None)
@given(numel=LENGTHS, where=st.floats(0, 1), bad=st.sampled_from(["nan", "inf", "-inf", None]),
       spec=st.sampled_from(["none", "fp16", "bf16"]))
def test_cast_finite_check_same_verdict_on_both_roads(numel, where, bad, spec):
    x = vector(numel, 8, "gauss")
    if bad is not None and numel:
        x[int(where * (numel - 1))] = float(bad)
    for name in ("reference", "native"):
        with road(name):
            if bad is None or not numel:
                from_spec(spec).compress(x)
            else:
                with pytest.raises(CompressionError, match=r"NaN or Inf \(1 of "):
                    from_spec(spec).compress(x)


@needs_kernels
def test_fp16_overflow_is_refused_on_both_roads():
    x = vector(1 << 19, 9, "gauss")
    x[77] = 1e6        # finite in float32, Inf once cast to float16
    for name in ("reference", "native"):
        with road(name), pytest.raises(CompressionError, match="overflows beyond"):
            from_spec("fp16").compress(x)


def test_default_finite_check_mode_is_auto():
    assert compressor_base.finite_check_mode() == "auto"


@needs_kernels
def test_a_compiler_without_openmp_builds_serial_kernels(fresh_library, tmp_path):
    """A compiler that refuses -fopenmp (no libgomp development files) still gives the kernels,
    built without OpenMP, with the same bytes."""
    import shutil
    gcc = shutil.which("gcc") or shutil.which("cc")
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && '
                       'echo "no omp.h" >&2 && exit 1; done\n'
                       f'exec {gcc} "$@"\n')
    wrapper.chmod(0o755)
    x = vector(1 << 19, 1, "gauss")
    fresh_library.setenv("HVDCOMP_NATIVE", "1")
    want = from_spec("sign").compress(x)
    _native.reset()
    for built in (tmp_path / "native").glob("kernels-*.so"):
        built.unlink()
    fresh_library.setenv("CC", str(wrapper))
    assert _native.library() is not None
    assert torch.equal(from_spec("sign").compress(x), want)
