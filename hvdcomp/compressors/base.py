"""The compressor interface: pure tensor math, no communication, no per-step state.

A compressor turns a 1-D float tensor of ``numel`` elements into a payload: one contiguous
``uint8`` tensor of exactly ``payload_nbytes(numel)`` bytes that carries everything the receiver
needs (values, indices, scales, norms), and decodes such a payload back into a tensor.

Why fixed-size payloads: the sharded exchange sends the N chunk payloads of a bucket with one
``alltoall`` and the server payloads with one ``allgather``; when every rank can compute every
payload's size from the chunk sizes alone, no sizes need to travel and no rank waits on another to
learn how much to receive. Compressors whose natural output varies (DGC's threshold selection) pad
to their worst case and say so in their docstring.

Error feedback (memories, momenta) belongs to the algorithms in :mod:`hvdcomp.algorithms`.
"""
from __future__ import annotations

import abc
from typing import Any, Dict, Sequence, Tuple

import torch


class CompressionError(ValueError):
    """Raised for input a compressor refuses (NaN/Inf, wrong payload size...)."""


class Compressor(abc.ABC):
    #: registry name, e.g. ``"sign"``
    name: str = ""
    #: True when decompress(Σ payloads) == Σ decompress(payload), i.e. payloads may be summed
    #: by an allreduce (none, fp16, shared-seed random-k).
    linear: bool = False

    @abc.abstractmethod
    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        """Exact number of bytes that travel for a chunk of ``numel`` elements of ``dtype``
        (only the lossless ``none`` depends on the dtype)."""

    @abc.abstractmethod
    def compress(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Encode the 1-D float tensor ``x``; returns a ``uint8`` tensor of
        ``payload_nbytes(x.numel())`` bytes on ``x.device``. ``seed`` is shared by all ranks for
        the same step and chunk (random-k draws its indices from it)."""

    @abc.abstractmethod
    def decompress(self, payload: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> torch.Tensor:
        """Decode ``payload`` into a 1-D tensor of ``numel`` elements and ``dtype``."""

    def roundtrip(self, x: torch.Tensor, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(payload, C(x))``: what travels and what the receiver will decode from it.

        Error feedback needs C(x) on the sender; compressors can override this when decoding
        their own payload is wasteful (they already hold the selected values)."""
        payload = self.compress(x, seed)
        return payload, self.decompress(payload, x.numel(), x.dtype, seed)

    def config(self) -> Dict[str, Any]:
        """Name and parameters; ranks compare these before the first exchange."""
        params = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {"name": self.name, **params}

    def spec(self) -> str:
        """The string :func:`hvdcomp.compressors.from_spec` turns back into this compressor."""
        params = {k: v for k, v in self.config().items() if k != "name"}
        if not params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(params.items()))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec()}>"


def check_finite(x: torch.Tensor, what: str = "gradient") -> None:
    """Refuse NaN/Inf instead of spreading them through every rank's error buffers."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise CompressionError(
            f"{what} contains NaN or Inf ({int((~torch.isfinite(x)).sum())} of {x.numel()} "
            "elements); lower the learning rate or enable gradient clipping")


def pack_payloads(payloads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate chunk payloads into the one buffer a collective sends."""
    if len(payloads) == 1:
        return payloads[0]
    return torch.cat(list(payloads))


def split_payloads(buffer: torch.Tensor, sizes: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """Views into ``buffer`` (no copies) of the given byte sizes."""
    if sum(sizes) != buffer.numel():
        raise CompressionError(
            f"payload buffer has {buffer.numel()} bytes, expected {sum(sizes)}: ranks disagree "
            "on the compressor or the chunk sizes")
    return torch.split(buffer, list(sizes))
