"""The compressors' CPU fast path: a few C kernels (:mod:`._native_src`,
:mod:`._native_src_codes`) built with the system C compiler on first use and loaded with
``ctypes``.

Why C and not ``torch.compile``: the kernels must give the pure-torch reference's bytes exactly,
and a reduction compiled by Inductor sums in its own order (the L1 norm's last bit would differ);
sign's encode compiled with Inductor took 608 s to compile on the (loaded) 2-core benchmark
machine and then ran at 6.5x a copy (docs/benchmarks.md).  The C kernels build in a few seconds
with no torch headers.

Selection, by the environment variable ``HVDCOMP_NATIVE``:
  unset or ``auto``  use the kernels when they build; otherwise the pure-torch reference runs;
  ``0`` / ``off``    never (always the reference);
  ``1`` / ``on``     require them: the first use raises CompressionError when they cannot build.
Either road gives identical payloads and decoded tensors (tests/test_fast_path.py), so the choice
changes speed only; :func:`status` says which road is in use and why.

Threads: each kernel runs in one OpenMP region on torch's own thread pool
(``torch.get_num_threads()`` threads; fewer for small tensors).  The library is built with
``-fopenmp`` only when torch's libgomp is already loaded in the process (:func:`_openmp_flags`);
otherwise the kernels run on the calling thread.  A process forked after torch ran a parallel
region must call ``torch.set_num_threads(1)`` before using either (GNU OpenMP's pool does not
survive a fork), as PyTorch's DataLoader workers do.

The shared library is cached under ``$HVDCOMP_CACHE_DIR`` (default ``~/.cache/hvdcomp``), keyed
by a hash of the source, the compiler flags and the CPU's feature flags (``-march=native``), and
written atomically, so ranks starting together on one node do not read a half-written file.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import List, Optional

import torch

from ._native_src import SOURCE
from .base import CompressionError, road_setting

# -ffp-contract=off: no fused multiply-adds, so float arithmetic rounds as torch's does;
# -fno-trapping-math lets loops with float selects vectorise (values unchanged: IEEE operations
# round the same whether or not the compiler assumes that they may trap)
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-strict-aliasing",
          "-ffp-contract=off", "-fno-trapping-math"]
#: elements per thread below which a kernel uses fewer threads (a region costs a few µs)
_GRAIN = 1 << 18
_lib: Optional[ctypes.CDLL] = None
_reason = "not loaded yet"
_tried = False

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "hv_init": (None, []),
    "hv_sign_encode_f32": (None, [_ptr, _ptr, _i64, _ptr, _ptr, _int]),
    "hv_l1_bins_f32": (None, [_ptr, _i64, _ptr, _int]),
    "hv_sign_decode_f32": (None, [_ptr, _i64, _ptr, _ptr, _int]),
    "hv_sign_decode_add_f32": (None, [_ptr, _i64, _ptr, _ptr, _int, ctypes.c_float, _int]),
    "hv_sign_decode_add2_f32": (None, [_ptr, _ptr, _ptr, _ptr, _i64, _ptr, _int]),
    "hv_sign_mean_add_f32": (None, [_ptr, _ptr, _int, _i64, ctypes.c_float, _ptr, _int]),
    "hv_count_nonfinite": (_i64, [_ptr, _i64, _int, _int]),
    "hv_qsgd_encode_f32": (None, [_ptr, _i64, ctypes.c_float, _int, _int, ctypes.c_uint32,
                                  ctypes.c_uint32, _ptr, _int]),
    "hv_qsgd_decode_f32": (None, [_ptr, _i64, _i64, _int, _int, ctypes.c_float, _ptr, _int]),
    "hv_candidates_f32": (_i64, [_ptr, _i64, ctypes.c_float, _ptr, _i64, _ptr]),
}


def setting() -> str:
    """``auto``, ``off`` or ``on`` from ``HVDCOMP_NATIVE``; anything else is an error."""
    return road_setting("HVDCOMP_NATIVE")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _cache_dir() -> str:
    root = os.environ.get("HVDCOMP_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "hvdcomp")
    return os.path.join(root, "native")


def _openmp_flags() -> List[str]:
    """``["-fopenmp"]`` when torch's GNU OpenMP runtime is loaded in this process (the kernels
    then share it: same soname, so the loader binds ours to torch's copy); else ``[]`` (serial
    kernels: never a second OpenMP runtime beside torch's)."""
    try:   # soname libgomp.so.1 (a package's vendored, renamed copy is another soname)
        with open("/proc/self/maps") as maps:
            loaded = any(os.path.basename(line.split()[-1]).startswith("libgomp.so")
                         for line in maps)
    except OSError:
        loaded = False
    return ["-fopenmp"] if loaded and torch.backends.openmp.is_available() else []


def _build(compiler: str) -> str:
    """The library's path, built first when not cached: with OpenMP where it applies, and
    serial when the OpenMP build fails (a compiler without libgomp's development files)."""
    openmp = _openmp_flags()
    try:
        return _build_with(compiler, _FLAGS + openmp)
    except subprocess.CalledProcessError:
        if not openmp:
            raise
        return _build_with(compiler, _FLAGS)


def _build_with(compiler: str, flags: List[str]) -> str:
    key = hashlib.sha256("\0".join([SOURCE, " ".join(flags), _cpu_flags()]).encode())
    target = os.path.join(_cache_dir(), f"kernels-{key.hexdigest()[:16]}.so")
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as work:
        source = os.path.join(work, "kernels.c")
        with open(source, "w") as handle:
            handle.write(SOURCE)
        built = os.path.join(work, "kernels.so")
        subprocess.run([compiler, *flags, source, "-o", built, "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(built, target)     # atomic: a concurrent rank sees the old or the new file
    return target


def _load() -> Optional[ctypes.CDLL]:
    """The library, or None (with the reason in ``_reason``); built at most once per process."""
    global _lib, _reason, _tried
    if _tried:
        return _lib
    _tried = True
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        _reason = "no C compiler (gcc/cc) on PATH"
        return None
    try:
        lib = ctypes.CDLL(_build(compiler))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        _reason = f"building the kernels failed: {detail.strip().splitlines()[-1:]}"
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    lib.hv_init()
    _lib, _reason = lib, "built"
    return _lib


def library() -> Optional[ctypes.CDLL]:
    """The kernels when the fast path is enabled and available, else None (use the reference).
    With ``HVDCOMP_NATIVE=1`` an unavailable library raises instead."""
    mode = setting()
    if mode == "off":
        return None
    lib = _load()
    if lib is None and mode == "on":
        raise CompressionError(f"HVDCOMP_NATIVE=1 but the compressors' C kernels are "
                               f"unavailable: {_reason}")
    return lib


def status() -> str:
    """One line: which road the CPU compressors take, and why."""
    mode = setting()
    if mode == "off":
        return "reference (HVDCOMP_NATIVE=0)"
    lib = _load()
    return "native C kernels" if lib is not None else f"reference ({_reason})"


def reset() -> None:
    """Forget the loaded library so that the next use re-reads the environment (tests)."""
    global _lib, _reason, _tried
    _lib, _reason, _tried = None, "not loaded yet", False


def usable(*tensors: torch.Tensor) -> Optional[ctypes.CDLL]:
    """The library when every tensor is a contiguous CPU tensor and the fast path is on."""
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return library()


# --- the kernels on tensors (callers check :func:`usable` first) ----------------------------------
def threads(numel: int) -> int:
    """Threads for a kernel over ``numel`` elements: torch's intra-op count, fewer for small
    tensors (at least :data:`_GRAIN` elements each)."""
    return max(1, min(torch.get_num_threads(), numel // _GRAIN))


def sign_encode(lib: ctypes.CDLL, x: torch.Tensor, bits: torch.Tensor,
                bins: "torch.Tensor | None", addend: "torch.Tensor | None" = None) -> None:
    """Sign bits of float32 ``x`` into ``bits``; with ``bins`` (256 int64, zeroed), also its L1
    exponent bins (integer sums: the threads' pieces add up to the same bins in any order).
    With ``addend`` (float32, ``x``'s size), ``x`` is first written as ``addend + x``, in the
    same pass, and the sums are encoded (as ``torch.add(addend, x, out=x)`` before)."""
    lib.hv_sign_encode_f32(addend.data_ptr() if addend is not None else None, x.data_ptr(),
                           x.numel(), bins.data_ptr() if bins is not None else None,
                           bits.data_ptr(), threads(x.numel()))


def l1_bins(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """The 256 L1 exponent bins of float32 ``x``."""
    bins = torch.zeros(256, dtype=torch.int64)
    lib.hv_l1_bins_f32(x.data_ptr(), x.numel(), bins.data_ptr(), threads(x.numel()))
    return bins


def sign_decode(lib: ctypes.CDLL, bits: torch.Tensor, numel: int, table: torch.Tensor,
                out: torch.Tensor) -> None:
    """``out[8q + i] = table[bits[q], i]`` (float32 table and out)."""
    lib.hv_sign_decode_f32(bits.data_ptr(), numel, table.data_ptr(), out.data_ptr(),
                           threads(numel))


def sign_decode_add(lib: ctypes.CDLL, bits: torch.Tensor, numel: int, table: torch.Tensor,
                    out: torch.Tensor, scale: "float | None" = None) -> None:
    """``out[8q + i] += table[bits[q], i]``, then ``out *= scale`` in float32 when a scale is
    given, in the same pass (float32 table and out)."""
    lib.hv_sign_decode_add_f32(bits.data_ptr(), numel, table.data_ptr(), out.data_ptr(),
                               scale is not None, 1.0 if scale is None else scale,
                               threads(numel))


def sign_decode_add2(lib: ctypes.CDLL, bits_a: torch.Tensor, table_a: torch.Tensor,
                     bits_b: torch.Tensor, table_b: torch.Tensor, numel: int,
                     out: torch.Tensor) -> None:
    """``out[8q + i] = (out[8q + i] + table_a[bits_a[q], i]) + table_b[bits_b[q], i]``, both
    additions in float32, in that order, in one pass."""
    lib.hv_sign_decode_add2_f32(bits_a.data_ptr(), table_a.data_ptr(), bits_b.data_ptr(),
                                table_b.data_ptr(), numel, out.data_ptr(), threads(numel))


def sign_mean_add(lib: ctypes.CDLL, bits: "list[torch.Tensor]", tables: "list[torch.Tensor]",
                  numel: int, scale: float, out: torch.Tensor) -> None:
    """``out += ((t_0 + t_1) + ... + t_{k−1}) · scale`` (the product only when k > 1), t_j being
    ``tables[j][bits[j][q], i]`` for element 8q + i: the server's v = m + e, with m the mean of
    k decoded payloads, in one pass (float32 tables and out)."""
    pointers = ctypes.c_void_p * len(bits)
    lib.hv_sign_mean_add_f32(pointers(*(b.data_ptr() for b in bits)),
                             pointers(*(t.data_ptr() for t in tables)), len(bits), numel,
                             scale, out.data_ptr(), threads(numel))


_NONFINITE_MASKS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def count_nonfinite(lib: ctypes.CDLL, x: torch.Tensor) -> "int | None":
    """Non-finite elements of a float32/float16/bfloat16 tensor; None for other dtypes."""
    if x.dtype == torch.float32:
        mask = 0
    elif x.dtype in _NONFINITE_MASKS:
        mask = _NONFINITE_MASKS[x.dtype]
    else:
        return None
    return lib.hv_count_nonfinite(x.data_ptr(), x.numel(), mask, threads(x.numel()))
