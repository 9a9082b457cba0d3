"""Buffers reused across rounds, for the exchange and the algorithms alike.

On CPU a round costs memory passes, and writing a freshly allocated large tensor costs page
faults worth several passes (docs/benchmarks.md), so the elementwise steps and the decoders write
into buffers kept per (bucket, role) across rounds.  Large fresh CPU buffers come from
:func:`hvdcomp.compressors._wire.allocate` (numpy: transparent huge pages).  A buffer's contents
are not state: checkpoints never carry them.

:func:`held_bytes` counts the bytes of the tensors an object keeps (its memory bound is tested
as a multiple of the bucket size in tests/test_memory_bound.py).
"""
from __future__ import annotations

import types
from typing import Dict, Tuple

import torch

from .compressors._wire import allocate

__all__ = ["ReusedBuffers", "allocate", "held_bytes", "store_difference"]


#: the bucket key of :meth:`ReusedBuffers.shared` buffers (no bucket is called that)
_SHARED = "\0shared"


class ReusedBuffers:
    """Work buffers, one per (bucket, role), kept across rounds; contents are garbage."""

    def __init__(self):
        self._buffers: Dict[Tuple[str, str], torch.Tensor] = {}

    def get(self, key: str, role: str, numel: int, dtype: torch.dtype,
            device) -> torch.Tensor:
        """An uninitialised 1-D buffer of ``numel`` elements, the same one every round."""
        buffer = self._buffers.get((key, role))
        if (buffer is None or buffer.numel() != numel or buffer.dtype != dtype
                or buffer.device != torch.device(device)):
            buffer = allocate(numel, dtype, device)
            self._buffers[(key, role)] = buffer
        return buffer

    def like(self, key: str, role: str, tensor: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous buffer of ``tensor``'s shape, dtype and device."""
        return self.get(key, role, tensor.numel(), tensor.dtype, tensor.device).view(tensor.shape)

    def shared(self, role: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised 1-D buffer of ``numel`` elements shared by every bucket: scratch for
        work that ends before the call that uses it returns (the two-phase rounds run one
        bucket's steps at a time).  It grows to the largest request and is never shrunk."""
        key = (_SHARED, f"{role}.{dtype}.{torch.device(device)}")
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = allocate(numel, dtype, device)
        return buffer[:numel]

    def tensors(self):
        return list(self._buffers.values())

    def discard(self, key: str) -> None:
        """Let go of every buffer of bucket ``key`` (a round that needs none of them: the memory
        goes back to the allocator; the next :meth:`get` allocates afresh)."""
        for held in [k for k in self._buffers if k[0] == key]:
            del self._buffers[held]

    def clear(self) -> None:
        self._buffers.clear()


def store_difference(store: Dict[str, torch.Tensor], key: str, minuend: torch.Tensor,
                     subtrahend: torch.Tensor) -> torch.Tensor:
    """``store[key] = minuend − subtrahend``, written into the tensor already stored under
    ``key`` when it fits (same values as a fresh subtraction, without the allocation), also
    when it *is* the minuend or the subtrahend (an elementwise op may write over its input;
    a partial overlap gets a fresh tensor)."""
    target = store.get(key)
    if (target is None or target.shape != minuend.shape or target.dtype != minuend.dtype
            or target.device != minuend.device or not target.is_contiguous()
            or _partly_overlaps(target, subtrahend) or _partly_overlaps(target, minuend)):
        store[key] = minuend - subtrahend
    else:
        torch.sub(minuend, subtrahend, out=target)
    return store[key]


def _partly_overlaps(target: torch.Tensor, other: torch.Tensor) -> bool:
    """Same first element but not the same elements (a full alias is fine for an elementwise op;
    other partial overlaps are not looked for, as before)."""
    return target.data_ptr() == other.data_ptr() and (target.shape != other.shape
                                                      or target.stride() != other.stride())


def held_bytes(*objects) -> int:
    """Bytes of the distinct tensor storages reachable from ``objects`` through attributes,
    dicts, lists and tuples (each storage counted once, however many views point into it);
    communicators are not followed (their tensors are the collectives', not the owner's)."""
    from .comm.base import Communicator     # a communicator's tensors are not the owner's
    seen_storages: Dict[int, int] = {}
    seen_objects = set()
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, Communicator):
            continue
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            seen_storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType,
                                                               types.FunctionType)):
            stack.extend(vars(obj).values())
    return sum(seen_storages.values())


def flat_target(out: torch.Tensor, flat: torch.Tensor, key: str) -> torch.Tensor:
    """``out`` as a flat tensor that an update of ``flat`` can be written into (ValueError
    naming the bucket when it cannot)."""
    if (not out.is_contiguous() or out.numel() != flat.numel() or out.dtype != flat.dtype
            or out.device != flat.device):
        raise ValueError(f"bucket {key!r}: update_into must be a contiguous {flat.dtype} tensor "
                         f"of {flat.numel()} elements on {flat.device}")
    return out.reshape(-1)
