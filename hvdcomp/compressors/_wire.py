"""Shared plumbing of the compressors: payload layouts, input and parameter checks.

A payload is a sequence of typed fields (scales, values, indices, bit planes). :class:`Layout`
orders them by decreasing item size, so that every field is aligned relative to the start of the
payload: a payload that starts on an aligned byte is decoded without copies, and one that does not
(it may sit at any offset of a packed buffer) is copied field by field by
:func:`~hvdcomp.compressors.base.read_field`.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import numpy as np
import torch

from .base import CompressionError, Compressor, read_field

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                 torch.uint8: np.uint8, torch.int32: np.int32, torch.int64: np.int64,
                 torch.bool: np.bool_}
_HUGE_PAGE_WORTHY = 1 << 20  # bytes


def allocate(numel: int, dtype: torch.dtype, device: torch.device, zero: bool = False
             ) -> torch.Tensor:
    """A fresh 1-D tensor (zeroed when ``zero``).

    Large CPU buffers are allocated by numpy and wrapped with ``torch.from_numpy`` (no copy):
    numpy asks the kernel for transparent huge pages (``madvise``), torch's CPU allocator does
    not unless the process sets ``THP_MEM_ALLOC_ENABLE=1`` before importing torch.  Writing a
    fresh 64 MiB torch buffer cost ~4-5x a memcpy in page faults on the benchmark machine, a
    numpy one ~1.3x (docs/benchmarks.md).  The result behaves like any CPU tensor."""
    device = torch.device(device)
    huge = numel * itemsize(dtype) >= _HUGE_PAGE_WORTHY
    if device.type == "cpu" and dtype in _NUMPY_DTYPES and huge:
        array = (np.zeros if zero else np.empty)(numel, dtype=_NUMPY_DTYPES[dtype])
        return torch.from_numpy(array)
    return (torch.zeros if zero else torch.empty)(numel, dtype=dtype, device=device)


class Layout:
    """Byte offsets of named fields ``(name, dtype, count)`` inside one payload."""

    def __init__(self, fields: Iterable[Tuple[str, torch.dtype, int]]):
        ordered = sorted(fields, key=lambda f: -itemsize(f[1]))  # stable: ties keep their order
        self.fields: Dict[str, Tuple[int, torch.dtype, int]] = {}
        offset = 0
        for name, dtype, count in ordered:
            self.fields[name] = (offset, dtype, count)
            offset += count * itemsize(dtype)
        self.nbytes = offset

    def allocate(self, device: torch.device) -> torch.Tensor:
        """A fresh (hence aligned) payload to fill through :meth:`view`."""
        return allocate(self.nbytes, torch.uint8, device)

    def view(self, payload: torch.Tensor, name: str) -> torch.Tensor:
        """Writable typed view of a field of a payload made by :meth:`allocate`."""
        offset, dtype, count = self.fields[name]
        return payload[offset:offset + count * itemsize(dtype)].view(dtype)

    def read(self, payload: torch.Tensor, name: str) -> torch.Tensor:
        """Typed field of a received payload (copied only when misaligned)."""
        offset, dtype, count = self.fields[name]
        return read_field(payload, offset, count, dtype)


class LayoutCompressor(Compressor):
    """A compressor whose payload for ``numel`` elements is the fixed :class:`Layout` that
    ``_layout(numel)`` returns; its size is the layout's, and an empty chunk sends nothing."""

    def _layout(self, numel: int) -> Layout:
        raise NotImplementedError

    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return self._layout(numel).nbytes if numel else 0


def flat_input(x: torch.Tensor, who: str) -> torch.Tensor:
    """``x`` as a contiguous 1-D float tensor, detached from autograd (compressors are not
    differentiable, and the CPU roads hand the memory to numpy); refuses integer and complex
    tensors."""
    if not isinstance(x, torch.Tensor):
        raise CompressionError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise CompressionError(
            f"{who}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    return x.detach().reshape(-1).contiguous()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision arithmetic runs in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_payload(payload: torch.Tensor, expected: int, who: str, numel: int) -> None:
    """Refuse a payload of the wrong type or size (ranks disagree on compressor or chunking)."""
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        got = payload.dtype if isinstance(payload, torch.Tensor) else type(payload).__name__
        raise CompressionError(f"{who}: payload must be a 1-D uint8 tensor, got {got}")
    if payload.numel() != expected:
        raise CompressionError(
            f"{who}: payload has {payload.numel()} bytes, expected {expected} for {numel} "
            "elements; sender and receiver disagree on the compressor or the chunk size")
    if not payload.is_contiguous():
        raise CompressionError(f"{who}: payload must be contiguous")


def check_out_dtype(dtype: torch.dtype, who: str) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise CompressionError(f"{who}: can only decode to a float dtype, got {dtype}")


# --- parameters ---------------------------------------------------------------------------------
def check_ratio(who: str, name: str, value) -> float:
    """A fraction in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{who}: {name} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_int(who: str, name: str, value, low: int, high: "int | None" = None) -> int:
    """An integer in [low, high] (high=None: no upper bound)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = f"in [{low}, {_bound_text(high)}]" if high is not None else f">= {low}"
        raise ValueError(f"{who}: {name} must be an integer {bound}, got {value!r}")
    return value


def _bound_text(n: int) -> str:
    """Large bounds as the docs write them: 2147483647 -> "2^31 - 1"."""
    if n >= 1 << 20 and (n + 1) & n == 0:
        return f"2^{(n + 1).bit_length() - 1} - 1"
    return str(n)


def check_bool(who: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{who}: {name} must be true or false, got {value!r}")
    return value


def selected_count(ratio: float, numel: int) -> int:
    """k = ceil(ratio · numel): at least one element of a non-empty chunk, at most all.

    The product is rounded to 9 decimals first so that float noise does not add an element
    (0.01 · 300 is 3.0000000000000004 in binary floating point; k is 3, not 4)."""
    if not numel:
        return 0
    # max(1, ...): a ratio so small that the rounding above gives 0 still sends one element
    return min(numel, max(1, math.ceil(round(ratio * numel, 9))))


# --- indices -------------------------------------------------------------------------------------
def index_dtype(numel: int) -> Tuple[torch.dtype, int]:
    """The narrowest integer type that holds indices 0..numel-1, and the offset subtracted before
    storing (int16 stores 0..65535 shifted down by 32768)."""
    if numel <= 1 << 8:
        return torch.uint8, 0
    if numel <= 1 << 16:
        return torch.int16, 1 << 15
    if numel <= 1 << 31:
        return torch.int32, 0
    raise CompressionError(f"chunks of {numel} elements are too large (at most 2^31)")


def encode_indices(indices: torch.Tensor, numel: int, out: torch.Tensor) -> None:
    _, offset = index_dtype(numel)
    out.copy_(indices - offset if offset else indices)


def decode_indices(stored: torch.Tensor, numel: int) -> torch.Tensor:
    _, offset = index_dtype(numel)
    indices = stored.to(torch.int64)
    return indices + offset if offset else indices


def mix_seeds(*seeds: int) -> int:
    """Combine integer seeds into one 63-bit seed (splitmix64 finaliser per step), deterministic
    across processes and Python versions, so every rank derives the same generator state."""
    state = 0x9E3779B97F4A7C15
    for seed in seeds:
        state = (state ^ (int(seed) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
        state = state * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state & 0x7FFFFFFFFFFFFFFF


def generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
