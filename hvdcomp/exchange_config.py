"""The cross-rank configuration check: ranks compare everything their exchanges must agree on
(algorithm, compressors, pattern, alignment, seed, world size, bucket sizes) with one allgather
of a JSON document before the first exchange of a bucket, and every rank raises the same error,
naming each setting that differs (:func:`config_differences`, also used by ``hvdcomp train``'s
agreement check)."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch

from .comm.base import Communicator, Handle, framed, unframe
from .errors import UserError

BucketSpec = Union[torch.Tensor, int, Tuple[int, torch.dtype]]


class ConfigMismatchError(UserError, ValueError):
    """Ranks disagree on the algorithm, compressors, pattern or bucket sizes."""


def bucket_spec(key: str, spec: BucketSpec) -> Tuple[int, torch.dtype]:
    """``(numel, dtype)`` of a bucket given as a tensor, a number of fp32 elements or the pair."""
    if isinstance(spec, torch.Tensor):
        return (spec.numel(), spec.dtype)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return (spec, torch.float32)
    if (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], int)
            and isinstance(spec[1], torch.dtype)):
        return (int(spec[0]), spec[1])
    raise ValueError(f"bucket {key!r}: give a tensor, a number of elements or "
                     f"(numel, dtype), not {spec!r}")


def post_config(comm: Communicator, config: Mapping[str, Any],
                buckets: Mapping[str, Tuple[int, torch.dtype]], name: str) -> Handle:
    """Launch the allgather of this rank's configuration as JSON bytes; :func:`verify_config`
    compares the gathered documents. Every rank sees the same documents, so every rank raises
    the same error."""
    document = {"exchange": dict(config),
                "buckets": {k: [n, str(d)] for k, (n, d) in sorted(buckets.items())}}
    data = json.dumps(document, sort_keys=True, default=str).encode()
    return comm.allgather_async(framed(data), name)


def verify_config(check: Handle, world_size: int) -> None:
    documents = [json.loads(data) for data in unframe(check.wait(), world_size)]
    differences = config_differences(documents)
    if differences:
        raise ConfigMismatchError(
            "ranks disagree on their hvdcomp configuration, so their exchanges cannot pair: "
            + "; ".join(differences)
            + ". Start every rank with the same algorithm, compressors, exchange pattern and "
              "model (same buckets)")


def _flatten(document: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(document, dict):
        flat: Dict[str, Any] = {}
        for key, value in document.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: document}


def config_differences(documents: Sequence[Mapping[str, Any]]) -> List[str]:
    """``"<setting>: rank 0 = a, rank 1 = b"`` for each setting that is not the same everywhere."""
    flats = [_flatten(doc) for doc in documents]
    keys = sorted(set().union(*flats))
    lines = []
    for key in keys:
        values = [flat.get(key, "<absent>") for flat in flats]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r} = {v!r}" for r, v in enumerate(values))
            lines.append(f"{key.replace('exchange.', '', 1)}: {shown}")
    return lines
