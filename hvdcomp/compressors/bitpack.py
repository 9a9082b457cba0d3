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

Unpacking uses a 256-row table: row b holds the 8 decoded values of byte b, so decoding is one
``index_select`` that writes each output element once.

CPU tensors take a faster road through numpy, whose ``packbits``/``unpackbits`` are SIMD loops
with the same bit order; this torch build's CPU ``index_select``, ``where`` and int8->float
conversions run far below memory bandwidth (measured in docs/benchmarks.md).  Both roads give the
same bytes and values; ``NUMPY_ON_CPU = False`` forces the torch road (tests compare them).

Multi-bit codes (QSGD) pack groups of 8 codes of ``b`` bits into ``b`` bytes through an int64
word (8·b ≤ 64 bits), code i of a group at bits [b·i, b·(i+1)) of the little-endian word.
"""
from __future__ import annotations

import sys
from typing import Dict, Tuple

import numpy as np
import torch

if sys.byteorder != "little":  # the word views below read bytes in little-endian order
    raise ImportError("hvdcomp.compressors.bitpack assumes a little-endian machine")

_GATHER_MAGIC = 0x8040201008040201 - (1 << 64)  # as a signed int64
#: take the numpy road for CPU tensors (see the module docstring)
NUMPY_ON_CPU = True
_TABLES: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}


def packed_nbytes(numel: int, bits: int = 1) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy: ceil(numel·bits / 8)."""
    return (numel * bits + 7) // 8


def pack_signs(x: torch.Tensor, out: torch.Tensor) -> None:
    """Write the bits ``x >= 0`` of the 1-D tensor ``x`` into the ``uint8`` tensor ``out`` of
    ``packed_nbytes(x.numel())`` bytes, MSB first."""
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


def unpack_signs(packed: torch.Tensor, numel: int, dtype: torch.dtype,
                 scale: "torch.Tensor | None" = None) -> torch.Tensor:
    """Decode packed sign bits into ``numel`` values ±1 (or ±scale when ``scale`` is a 0-d
    tensor) of ``dtype``.  Returns a contiguous 1-D tensor."""
    if packed.device.type == "cpu" and NUMPY_ON_CPU:
        bits = np.unpackbits(packed.numpy(), count=numel)   # 0/1 per element, MSB first
        np.left_shift(bits, 1, out=bits)
        bits -= 1                                            # 1 -> 1, 0 -> 255 = int8 −1
        work = np.float64 if dtype == torch.float64 else np.float32
        values = torch.from_numpy(bits.view(np.int8).astype(work))
        if scale is not None:
            values.mul_(scale.to(values.dtype))
        return values if values.dtype == dtype else values.to(dtype)
    table = _sign_table(packed.device, dtype)
    if scale is not None:
        table = table * scale.to(dtype)
    values = torch.index_select(table, 0, packed.to(torch.int32))
    return values.view(-1)[:numel]


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
