"""Vectorised bit packing with plain torch ops (no Python loops, runs unchanged on CUDA).

Sign bits are packed most significant bit first, as ``numpy.packbits`` does by default: element
``8·q + i`` is bit ``7 − i`` of byte ``q``; the padding bits of the last byte are 0.

Packing uses one multiplication per 8 elements.  Read the bool flags of elements 8q..8q+7 as one
little-endian ``int64`` word w = Σ_i b_i·2^(8i) (b_i ∈ {0, 1}) and multiply by
M = 0x8040201008040201 = Σ_j 2^(9j):
    w·M = Σ_ij b_i·2^(8i + 9j) = Σ_ij b_i·2^(8(i + j) + j).
The terms with i + j = 7 land on bit 56 + j = 56 + (7 − i) of the top byte, exactly the packed
byte; terms with i + j < 7 stay below bit 56, on distinct bits (8(i+j) + j is unique for
j ≤ 7), so nothing carries into the top byte; terms with i + j > 7 overflow past bit 63 (int64
multiplication wraps on CPU and CUDA).  The top byte is then copied out with a strided view,
instead of eight shift-and-or passes.

Unpacking uses a 256-row table: row b holds the 8 decoded values of byte b (±1, or ±scale when
the scale is folded into the 2048-entry table), so decoding is one gather that reads d/8 bytes
and writes each output element once: ``index_select`` on CUDA, numpy's ``take`` on CPU.  Given
``out=`` it writes into the caller's buffer (a slice of a bucket): on CPU the write into a fresh
torch tensor costs more than the gather itself (page faults; ~5x a copy for 64 MiB, against ~1x
for the gather into an existing buffer, docs/benchmarks.md), so the exchange decodes into
buffers it reuses, and fresh outputs are allocated through numpy (huge pages).

On CPU with the C kernels available (:mod:`._native`, ``HVDCOMP_NATIVE``), float32 packing and
decoding run in C instead (one pass each, all threads); the roads below are the reference.
Otherwise, on CPU, packing and unpacking go through numpy (``packbits`` is a SIMD loop with the
same bit order; ``take`` gathers the table rows on one thread at about copy speed, where torch's CPU
``index_select`` needs both cores for that); ``NUMPY_ON_CPU = False`` forces the torch road
(tests compare them).  Both roads give the same bytes and values.

Multi-bit codes (QSGD) pack groups of 8 codes of ``b`` bits into ``b`` bytes through an int64
word (8·b ≤ 64 bits), code i of a group at bits [b·i, b·(i+1)) of the little-endian word.
"""
from __future__ import annotations

import sys
from typing import Dict, Tuple

import numpy as np
import torch

from . import _native, _triton
from ._wire import allocate

if sys.byteorder != "little":  # the word views below read bytes in little-endian order
    raise ImportError("hvdcomp.compressors.bitpack assumes a little-endian machine")

_GATHER_MAGIC = 0x8040201008040201 - (1 << 64)  # as a signed int64
#: take the numpy road for CPU tensors (see the module docstring)
NUMPY_ON_CPU = True
_TABLES: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}
#: dtypes the CPU road gathers with numpy (numpy has no bfloat16)
_NUMPY_GATHER = (torch.float16, torch.float32, torch.float64)


def packed_nbytes(numel: int, bits: int = 1) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy: ceil(numel·bits / 8)."""
    return (numel * bits + 7) // 8


def pack_signs(x: torch.Tensor, out: torch.Tensor) -> None:
    """Write the bits ``x >= 0`` of the 1-D tensor ``x`` into the ``uint8`` tensor ``out`` of
    ``packed_nbytes(x.numel())`` bytes, MSB first."""
    if x.is_cuda and _triton.usable(x, out):   # the GPU road: one pass, same bits
        _triton.sign_pack(x, out)
        return
    lib = _native.usable(x, out) if x.dtype == torch.float32 else None
    if lib is not None:      # the C road: one pass, same bits
        _native.sign_encode(lib, x, out, None)
        return
    if x.device.type == "cpu" and NUMPY_ON_CPU:
        if x.dtype in (torch.float32, torch.float64):
            nonnegative = np.greater_equal(x.numpy(), 0)   # numpy's compare is the faster here
        else:
            nonnegative = torch.ge(x, 0).numpy()
        out.copy_(torch.from_numpy(np.packbits(nonnegative)))
        return
    flags = flag_buffer(x.numel(), x.device)
    torch.ge(x, 0, out=flags[:x.numel()])
    pack_flag_buffer(flags, out)


def flag_buffer(numel: int, device: torch.device) -> torch.Tensor:
    """A bool buffer of ceil(numel/8)·8 entries with the padding tail already False; the caller
    fills the first ``numel`` (``torch.ge(x, 0, out=buffer[:numel])``) and hands it to
    :func:`pack_flag_buffer`."""
    padded = packed_nbytes(numel) * 8
    buffer = torch.empty(padded, dtype=torch.bool, device=device)
    if padded > numel:
        buffer[numel:].fill_(False)
    return buffer


def pack_flag_buffer(flags: torch.Tensor, out: torch.Tensor) -> None:
    """Pack a buffer from :func:`flag_buffer` (8·n bools) into the ``uint8`` tensor ``out`` (n
    bytes).  Destroys ``flags`` (the multiply runs in place)."""
    words = flags.view(torch.uint8).view(torch.int64)
    words.mul_(_GATHER_MAGIC)
    out.copy_(words.view(torch.uint8)[7::8])


def _sign_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8) table of ±1: row b, column i is +1 when bit 7 − i of b is set, else −1."""
    key = (device, dtype)
    table = _TABLES.get(key)
    if table is None:
        byte = torch.arange(256, device=device).unsqueeze(1)
        bit = torch.arange(7, -1, -1, device=device).unsqueeze(0)
        table = (((byte >> bit) & 1) * 2 - 1).to(dtype)
        _TABLES[key] = table
    return table


def _scaled_sign_table(device: torch.device, dtype: torch.dtype,
                       scale: "torch.Tensor | None") -> torch.Tensor:
    """The (256, 8) table of ±1, or of ±scale, in ``dtype``.

    The product is formed in float32 for half dtypes and then rounded (float64 stays float64),
    so every entry is round_dtype(±1 · scale) — the value an elementwise decode gives; since
    ±1 · s is exact and rounding is symmetric, that is ±round_dtype(s)."""
    if scale is None:
        return _sign_table(device, dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    table = _sign_table(device, work) * scale.to(device=device, dtype=work)
    return table if work == dtype else table.to(dtype)


def unpack_signs(packed: torch.Tensor, numel: int, dtype: torch.dtype,
                 scale: "torch.Tensor | None" = None,
                 out: "torch.Tensor | None" = None) -> torch.Tensor:
    """Decode packed sign bits into ``numel`` values ±1 (or ±scale when ``scale`` is a 0-d
    tensor) of ``dtype``.  Returns a contiguous 1-D tensor: ``out`` when given (a 1-D tensor of
    ``numel`` elements of ``dtype``, e.g. a slice of a bigger buffer), else a new one."""
    if out is None:
        out = allocate(numel, dtype, packed.device)
    elif out.dim() != 1 or out.numel() != numel or out.dtype != dtype:
        raise ValueError(f"unpack_signs: out must be a 1-D {dtype} tensor of {numel} elements, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if not numel:
        return out
    if not out.is_contiguous():   # the gather writes whole rows: decode aside, then copy
        out.copy_(unpack_signs(packed, numel, dtype, scale))
        return out
    if out.is_cuda and _triton.usable(packed, out):   # the GPU road: one pass, same values
        _triton.sign_decode(packed, numel, scale, out)
        return out
    table = _scaled_sign_table(packed.device, dtype, scale)
    lib = _native.usable(packed, out, table) if dtype == torch.float32 else None
    if lib is not None:      # the C road: copies the same table rows, on all threads
        _native.sign_decode(lib, packed, numel, table, out)
        return out
    whole, tail = divmod(numel, 8)
    if whole and packed.device.type == "cpu" and NUMPY_ON_CPU and dtype in _NUMPY_GATHER:
        # numpy's take (mode="clip": no bounds check, so no buffered copy of the output) runs
        # on one thread at ~1x a copy; torch's index_select needs several threads for that,
        # and several threads writing a freshly mapped output stall on page faults for the
        # first calls of a process (55-120 ms against ~10 ms for 64 MiB, docs/benchmarks.md)
        np.take(table.numpy(), packed[:whole].numpy(), axis=0, mode="clip",
                out=out[:whole * 8].view(whole, 8).numpy())
    elif whole:
        index = packed[:whole].to(torch.int32)
        torch.index_select(table, 0, index, out=out[:whole * 8].view(whole, 8))
    if tail:   # the last, partial byte: its first ``tail`` columns (index_select, not
        # table[0-d tensor], which reads the index on the host: a sync on CUDA)
        row = torch.index_select(table, 0, packed[whole:whole + 1].to(torch.int64))
        out[whole * 8:].copy_(row[0, :tail])
    return out


def add_signs(packed: torch.Tensor, numel: int, scale: torch.Tensor, out: torch.Tensor,
              then_scale: "float | None" = None) -> bool:
    """``out += ±scale`` from the packed bits (then ``out *= then_scale``) in one pass when the
    C kernels can (float32, contiguous CPU ``out``); returns False, touching nothing, when they
    cannot."""
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() != numel:
        return False
    table = _scaled_sign_table(packed.device, torch.float32, scale)
    lib = _native.usable(packed, out, table)
    if lib is None:
        return False
    _native.sign_decode_add(lib, packed, numel, table, out, then_scale)
    return True


def add_two_signs(packed_a: torch.Tensor, scale_a: torch.Tensor, packed_b: torch.Tensor,
                  scale_b: torch.Tensor, numel: int, out: torch.Tensor) -> bool:
    """``out = (out + ±scale_a) + ±scale_b`` from two sets of packed bits, in one pass, when the
    C kernels can (float32, contiguous CPU ``out``); returns False, touching nothing, when they
    cannot.  The same two float additions, in the same order, as two :func:`add_signs`."""
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() != numel:
        return False
    table_a = _scaled_sign_table(packed_a.device, torch.float32, scale_a)
    table_b = _scaled_sign_table(packed_b.device, torch.float32, scale_b)
    lib = _native.usable(packed_a, packed_b, out, table_a, table_b)
    if lib is None:
        return False
    _native.sign_decode_add2(lib, packed_a, table_a, packed_b, table_b, numel, out)
    return True


def decodes_onto(out: torch.Tensor) -> bool:
    """Whether the C kernels (:func:`add_signs`, :func:`add_two_signs`, :func:`add_mean_signs`)
    decode onto a tensor of ``out``'s device and dtype: float32 on CPU, with the kernels built
    and switched on."""
    return out.dtype == torch.float32 and _native.usable(out) is not None


def add_mean_signs(packed: "list[torch.Tensor]", scales: "list[torch.Tensor]", numel: int,
                   out: torch.Tensor) -> bool:
    """``out += (C_0 + C_1 + ... + C_{k−1}) · (1/k)`` from k sets of packed bits with their
    scales, in one pass, when the C kernels can (float32, contiguous CPU ``out``); returns False,
    touching nothing, when they cannot.  The same float operations in the same order as
    decoding the first, :func:`add_signs` of the others (the product with the last) and adding
    the sum to ``out``."""
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() != numel or not packed:
        return False
    lib = _native.usable(out, *packed)       # before the tables: none is built in vain on a GPU
    if lib is None:
        return False
    tables = [_scaled_sign_table(p.device, torch.float32, s) for p, s in zip(packed, scales)]
    _native.sign_mean_add(lib, list(packed), tables, numel, 1.0 / len(packed), out)
    return True


def pack_codes(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack integer codes in [0, 2^bits) (any integer dtype, 1-D) into ``out`` (uint8 of
    ``packed_nbytes(len(codes), bits)`` bytes), ``bits`` ≤ 8, LSB first."""
    numel = codes.numel()
    groups = (numel + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    padded[:numel] = codes
    shifts = torch.arange(0, 8 * bits, bits, device=codes.device, dtype=torch.int64)
    words = (padded.view(groups, 8) << shifts).sum(1)          # codes occupy disjoint bits
    out.copy_(words.view(torch.uint8).view(groups, 8)[:, :bits].reshape(-1)[:out.numel()])


def unpack_codes(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``numel`` codes as int64."""
    groups = (numel + 7) // 8
    word_bytes = torch.zeros(groups, 8, dtype=torch.uint8, device=packed.device)
    flat = torch.zeros(groups * bits, dtype=torch.uint8, device=packed.device)
    flat[:packed.numel()] = packed
    word_bytes[:, :bits] = flat.view(groups, bits)
    words = word_bytes.view(torch.int64).view(groups, 1)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=torch.int64)
    codes = (words >> shifts) & ((1 << bits) - 1)
    return codes.view(-1)[:numel]
