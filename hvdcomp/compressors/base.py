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
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..errors import UserError


class CompressionError(UserError, ValueError):
    """Raised for input a compressor refuses (NaN/Inf, wrong payload size...)."""


class Compressor(abc.ABC):
    #: registry name, e.g. ``"sign"``
    name: str = ""
    #: True when decompress(Σ payloads) == Σ decompress(payload), i.e. payloads may be summed
    #: by an allreduce (none, fp16, shared-seed random-k).
    linear: bool = False
    #: Constructor parameter -> its valid values in words ("a number in (0, 1]"), as the
    #: constructor checks them; :func:`hvdcomp.compressors.from_spec` names these in its errors
    #: and docs/algorithms.md lists them. None: not declared (from_spec then reads the names
    #: from the constructor's signature).
    parameters: "Dict[str, str] | None" = None

    # --- what the exchange reads (declared here; hvdcomp.exchange reads nothing else) ----------
    #: True for a compressor whose scale covers the whole bucket (``sign``): the exchange then
    #: passes ``bucket=(‖bucket‖₁, numel)`` to ``roundtrip_into`` with every chunk, summed from
    #: :meth:`partial_norm` of the chunks (see :mod:`hvdcomp.exchange_codec`).
    needs_bucket_norm: bool = False

    @property
    def alignment(self) -> int:
        """Elements: the exchange cuts buckets into chunks only at multiples of this, so that
        a blockwise compressor's blocks never straddle two ranks' chunks (then its output is
        the same sharded as on the whole bucket).  1 (any cut) by default; a compressor with a
        ``block`` parameter (``blocksign``) declares its block.  Override to declare another."""
        block = getattr(self, "block", None)
        if isinstance(block, int) and not isinstance(block, bool) and block > 0:
            return block
        return 1

    def partial_norm(self, x: torch.Tensor) -> torch.Tensor:
        """For ``needs_bucket_norm``: this part's share of the bucket norm (summed over parts)."""
        raise NotImplementedError(f"{self.name} does not declare needs_bucket_norm")

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

    # --- writing into the caller's buffer (optional; the defaults copy) -------------------------
    # The exchange decodes the chunks of a bucket into slices of one buffer that it reuses across
    # rounds: on CPU, writing a freshly allocated tensor costs page faults worth several copies,
    # and concatenating decoded chunks costs one more pass.  Compressors that can write in place
    # override ``decompress_into``; the results are the same values either way.
    def decompress_into(self, payload: torch.Tensor, out: torch.Tensor,
                        seed: int = 0) -> torch.Tensor:
        """Decode ``payload`` into the existing 1-D tensor ``out`` (``out.numel()`` elements of
        ``out.dtype``, e.g. a slice of a bucket) and return ``out``; the values are those
        ``decompress(payload, out.numel(), out.dtype, seed)`` returns."""
        return out.copy_(self.decompress(payload, out.numel(), out.dtype, seed).view_as(out))

    def decompress_add_into(self, payload: torch.Tensor, out: torch.Tensor,
                            scratch: Optional[torch.Tensor], seed: int = 0,
                            scale: Optional[float] = None) -> torch.Tensor:
        """``out += decompress(payload)`` (the server's sum of N decoded chunks), then
        ``out *= scale`` when ``scale`` is given (the average, as Horovod scales: a product in
        ``out``'s dtype), and return ``out``.  ``scratch`` is a buffer like ``out`` (not
        overlapping it; None: a fresh one) that this default decodes into first.  A compressor
        that decodes, adds and scales in one pass overrides it; the sum and the product are the
        same float operations either way."""
        if scratch is None:
            scratch = torch.empty_like(out)
        out.add_(self.decompress_into(payload, scratch, seed))
        # times the scale as hvdcomp.comm.base.scale_like_horovod does (Horovod's Average)
        return out if scale is None else out.mul_(scale)

    def decompress_sub_into(self, payload: torch.Tensor, out: torch.Tensor,
                            scratch: Optional[torch.Tensor] = None,
                            seed: int = 0) -> torch.Tensor:
        """``out −= decompress(payload)`` and return ``out``: the error-feedback residual
        x − C(x) written over x when ``out`` holds x and ``payload`` is its encoding.
        ``scratch`` is a buffer like ``out`` (not overlapping it; None: a fresh one) that this
        default decodes into first; a compressor that subtracts in the decoder's pass overrides
        it (``sign``).  The difference is the same float operation either way."""
        if scratch is None:
            scratch = torch.empty_like(out)
        return out.sub_(self.decompress_into(payload, scratch, seed))

    def decompress_mean_add_into(self, payloads: Sequence[torch.Tensor], out: torch.Tensor,
                                 seed: int = 0) -> Optional[torch.Tensor]:
        """``out += (C(p_0) + ... + C(p_{N−1})) · (1/N)`` in the decoder's pass, summed and scaled
        as :func:`hvdcomp.exchange_codec.decode_mean_into` does, and return ``out``: the
        server's v = m + e written over e without a buffer for the mean m.  None, touching
        nothing, when the compressor cannot (this default; ``sign`` on CPU with the C kernels
        can): the exchange then decodes m into a buffer and the algorithm adds it."""
        return None

    def decodes_onto(self, out: torch.Tensor) -> bool:
        """Whether the one-pass hooks decode onto a tensor of ``out``'s device and dtype in their
        own pass: :meth:`decompress_mean_add_into` adds instead of returning None, and
        :meth:`decompress_add_into` and :meth:`decompress_sub_into` (and ``sign``'s
        ``decompress_sub_add_into``) need no scratch.  Asked before the exchange makes a tensor
        for them (the server's first e, as −0.0; the worker's scratch).  False here; ``sign``
        answers for float32 on CPU with the C kernels."""
        return False

    def roundtrip_into(self, x: torch.Tensor, out: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Like :meth:`roundtrip`, with C(x) written into ``out`` (1-D, same numel and dtype as
        ``x``); returns the payload.  A compressor that overrides :meth:`roundtrip` keeps its
        shortcut (its C(x) is copied into ``out``); otherwise the payload is decoded straight
        into ``out`` with :meth:`decompress_into`."""
        if type(self).roundtrip is not Compressor.roundtrip:
            payload, decoded = self.roundtrip(x, seed)
            out.copy_(decoded.view_as(out))
            return payload
        payload = self.compress(x, seed)
        self.decompress_into(payload, out, seed)
        return payload

    def wire_dtype(self, dtype: torch.dtype = torch.float32) -> torch.dtype:
        """For a linear compressor: the dtype to view its payload as when an allreduce sums
        payloads (``payload.view(wire_dtype)``).  Non-linear compressors raise."""
        raise TypeError(f"{self.name} is not linear: its payloads cannot be summed")

    def contraction_problem(self) -> "str | None":
        """None when C is a δ-contraction, E‖C(x) − x‖² ≤ (1 − δ)‖x‖² with δ > 0 (every chunk
        size), which error feedback needs: it re-sends C's error, and an error larger than ‖x‖
        grows every round until the run diverges. Otherwise why not, and the fix (algorithms
        with error feedback refuse such a compressor up front)."""
        return None

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


# --- finiteness -------------------------------------------------------------------------------
#
# A NaN or Inf that enters a compressor ends up in every rank's error-feedback buffers and never
# leaves, so compressors refuse it.  Reading a verdict back from a CUDA tensor synchronises the host
# with the device, which stalls the backward pass; the mode below lets a run choose:
#
#   "auto"     (default) CPU tensors are checked at once (no device to wait for); CUDA tensors as
#              in "deferred", and each later check also polls, without waiting, the counts whose
#              copy to the host has completed (a CUDA event), raising there: a NaN is reported a
#              few buckets late, never a sync per bucket.  :func:`raise_if_nonfinite` (once per
#              step) reports what is still in flight.
#   "always"   check every compressed tensor at once; on CUDA this costs one sync per call.
#   "deferred" CUDA tensors add their count of non-finite elements to a device-side counter
#              (no sync); call :func:`raise_if_nonfinite` once per step, where the caller syncs
#              anyway (after the optimizer step).  CPU tensors are still checked at once.
#   "off"      no check; a NaN spreads.  For benchmarks only.
#
# Compressors pass a ``summary``: a reduction they compute anyway (an L1 or L2 norm, the top-k
# maximum) that is non-finite whenever ``x`` has a non-finite element, so the check reads one
# number instead of making another pass over ``x``.  Without one (none, fp16, bf16) a CPU tensor
# is scanned by the C kernel of :mod:`._native` (a read at memory speed on all threads) when it is
# available, else by ``torch.isfinite``.
FINITE_CHECK_MODES = ("auto", "always", "deferred", "off")
_finite_check_mode = "auto"
_deferred_nonfinite: Dict[torch.device, torch.Tensor] = {}
#: device -> (pinned host copy of its counter, event recorded after the copy) for "auto"
_polls: Dict[torch.device, Tuple[torch.Tensor, Any]] = {}


def road_setting(variable: str) -> str:
    """``auto``, ``off`` or ``on`` from the environment variable that selects a fast road
    (``HVDCOMP_NATIVE``, ``HVDCOMP_TRITON``); anything else is an error naming the variable."""
    value = os.environ.get(variable, "auto").strip().lower()
    aliases = {"": "auto", "auto": "auto", "0": "off", "off": "off", "false": "off",
               "1": "on", "on": "on", "true": "on"}
    if value not in aliases:
        raise CompressionError(f"{variable} must be auto, 0/off or 1/on, got {value!r}")
    return aliases[value]


def set_finite_check(mode: str) -> str:
    """Select how compressors check for NaN/Inf (see the comment above); returns the old mode."""
    global _finite_check_mode
    if mode not in FINITE_CHECK_MODES:
        raise ValueError(f"finite check mode must be one of {', '.join(FINITE_CHECK_MODES)}, "
                         f"got {mode!r}")
    old, _finite_check_mode = _finite_check_mode, mode
    return old


def finite_check_mode() -> str:
    return _finite_check_mode


def _nonfinite_error(what: str, bad: int) -> CompressionError:
    return CompressionError(
        f"{what} contained NaN or Inf ({bad} elements since the last check); lower the "
        "learning rate or enable gradient clipping")


def raise_if_nonfinite(what: str = "gradient") -> None:
    """In ``"deferred"`` and ``"auto"`` modes: raise CompressionError if any tensor checked since
    the last call had a NaN/Inf.  Reads one number per device (one sync); resets the counters."""
    pending = list(_deferred_nonfinite.items())
    _deferred_nonfinite.clear()
    _polls.clear()
    bad = sum(int(count) for _, count in pending)
    if bad:
        raise _nonfinite_error(what, bad)


def _defer(probe: torch.Tensor, what: str) -> None:
    """Add the count of non-finite elements of a device tensor to its device's counter; in
    "auto" mode, first raise what an earlier, completed copy of the counter shows (no wait)."""
    device = probe.device
    poll = _polls.get(device)
    if poll is not None and poll[1].query():         # the copy has landed: reading it is free
        if int(poll[0]):
            _deferred_nonfinite.pop(device, None)
            _polls.pop(device, None)
            raise _nonfinite_error(what, int(poll[0]))
    count = (~torch.isfinite(probe)).sum()
    previous = _deferred_nonfinite.get(device)
    _deferred_nonfinite[device] = count = count if previous is None else previous + count
    if _finite_check_mode == "auto" and device.type == "cuda":
        host = poll[0] if poll is not None else torch.empty((), dtype=count.dtype,
                                                            pin_memory=True)
        host.copy_(count, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        _polls[device] = (host, event)


def _all_finite_cpu(x: torch.Tensor) -> bool:
    """Whether a CPU tensor is all finite: the C kernel's count when it applies, else torch."""
    from . import _native
    lib = _native.usable(x)
    count = _native.count_nonfinite(lib, x.reshape(-1)) if lib is not None else None
    return bool(torch.isfinite(x).all()) if count is None else count == 0


def check_finite(x: torch.Tensor, what: str = "gradient",
                 summary: "torch.Tensor | None" = None) -> None:
    """Refuse NaN/Inf instead of spreading them through every rank's error buffers.

    ``summary``: optional tensor computed from ``x`` (a norm, a sum) that is non-finite whenever
    ``x`` is; the check then reads ``summary`` instead of scanning ``x``.  A summary can also be
    non-finite when a finite ``x`` overflows it (|x| beyond ~1e19 for an fp32 L2 norm): such a
    tensor could not travel either, because its scale would be Inf on the wire."""
    if not x.numel() or _finite_check_mode == "off":
        return
    probe = summary if summary is not None else x
    if _finite_check_mode in ("deferred", "auto") and probe.device.type != "cpu":
        _defer(probe, what)
        return
    finite = (_all_finite_cpu(probe) if probe.device.type == "cpu" and summary is None
              else bool(torch.isfinite(probe).all()))
    if not finite:
        nonfinite = int((~torch.isfinite(x)).sum())
        detail = (f"{nonfinite} of {x.numel()} elements" if nonfinite
                  else "finite values too large for the wire format")
        raise CompressionError(
            f"{what} contains NaN or Inf ({detail}); lower the learning rate or enable "
            "gradient clipping")


# --- payload bytes -------------------------------------------------------------------------------
def read_field(payload: torch.Tensor, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` elements of ``dtype`` stored at byte ``offset`` of the ``uint8`` ``payload``.

    A payload may start at any byte of a packed buffer, and ``Tensor.view(dtype)`` needs the
    storage offset to be a multiple of the item size; misaligned fields are copied (a few bytes
    for scales, the whole field otherwise), aligned ones are viewed without a copy."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = payload[offset:offset + count * itemsize]
    if raw.numel() != count * itemsize:
        raise CompressionError(f"payload too short: field of {count} x {dtype} at byte {offset}")
    if itemsize > 1 and (raw.storage_offset() % itemsize or raw.data_ptr() % itemsize):
        raw = raw.clone()
    return raw.view(dtype)


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
