"""What a method leaves uncompressed, and what one compressed message costs.

Momentum of the tensors a method does not compress.  DGC and EF21-SGDM carry their momentum inside
the compressed direction, so ``hvdcomp train`` runs the wrapped SGD with momentum 0.  But some
tensors never pass through their compression: those under ``small_tensor_bytes`` (biases, norms:
the optimizer exchanges them with a plain dense average) and, for DGC per layer, every tensor of
dim ≤ 1 (the paper compresses only dim > 1; they travel dense inside the bucket).  Left at
momentum 0 they would train with momentum-free SGD — on the digits MLP that is the whole output
layer.  The DGC reference applies ordinary momentum to them after averaging (``compensate(...,
accumulate=False)``: u ← m·u + G), which is torch's SGD momentum m on that parameter group
(weight decay included, as the reference's DGCSGD does).  EF21-SGDM's estimator
v ← (1 − η)·v + η·g (v⁰ = g) is torch's SGD with momentum = dampening = 1 − η.  So these tensors
get their own parameter group with the method's momentum; everything else keeps ``--momentum``.

Compression per message.  The run's ratio against P-SGD (:func:`.results.compression_ratio`) pays
for everything sent: DGC's warm-up epochs at densities 25 %…0.4 %, the dense small tensors, the
allgather's N − 1 copies.  The per-message figure says what one worker's uplink message of the
compressed buckets weighs against the same tensors dense, at the last step's compressor.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch

def _method(cfg):
    """The registered class of ``cfg.algorithm``, or None (a record of an unknown method)."""
    from hvdcomp.algorithms import registry
    try:
        return registry.method(str(cfg.algorithm))
    except ValueError:
        return None


def uncompressed_group_options(cfg) -> Optional[Dict[str, Any]]:
    """SGD options for the tensors ``cfg.algorithm`` does not compress, or None when they train
    like the others: each method's ``dense_tensor_momentum`` hook (DGC's m; EF21-SGDM's
    momentum = dampening = 1 − η; every other method None)."""
    method = _method(cfg)
    return None if method is None else method.dense_tensor_momentum(cfg.algorithm_options)


def is_uncompressed(cfg, parameter: torch.Tensor, small_tensor_bytes: int) -> bool:
    """True for a tensor the method sends dense: under ``small_tensor_bytes`` (the optimizer's
    rule), or of dim ≤ 1 under DGC per layer."""
    if parameter.numel() * parameter.element_size() < small_tensor_bytes:
        return True
    method = _method(cfg)
    return method is not None and method.sends_dense(parameter, cfg.algorithm_options)


def parameter_groups(model: torch.nn.Module, cfg, small_tensor_bytes: int) -> List[Dict[str, Any]]:
    """The SGD parameter groups of ``model`` for ``cfg``: one group, or (for a method with a
    ``dense_tensor_momentum``) the compressed tensors at ``--momentum`` and the uncompressed
    ones at the method's momentum.
    Group order follows the parameters' order, so every rank builds the same groups."""
    params = [p for p in model.parameters()]
    own = uncompressed_group_options(cfg)
    if own is None:
        return [{"params": params}]
    dense = [p for p in params if is_uncompressed(cfg, p, small_tensor_bytes)]
    dense_ids = {id(p) for p in dense}
    compressed = [p for p in params if id(p) not in dense_ids]
    groups = [{"params": compressed}] if compressed else []
    if dense:
        groups.append({"params": dense, **own})
    return groups


def describe_momentum(config: Dict[str, Any]) -> str:
    """For the summary, from a run's config record: the SGD momentum of each kind of tensor."""
    cfg = SimpleNamespace(algorithm=config.get("algorithm"),
                          algorithm_options=config.get("algorithm_options") or {})
    text = f"{config.get('momentum', 0.0):g}" + (" Nesterov" if config.get("nesterov") else "")
    own = uncompressed_group_options(cfg)
    if own is None:
        return text
    dense = f"{own['momentum']:g}" + (f" (dampening {own['dampening']:g})"
                                       if own["dampening"] else "")
    return f"{text} (compressed; momentum inside the method), {dense} (tensors sent dense)"


def message_compression(optimizer) -> Dict[str, float]:
    """``{"compression_per_message": dense bytes / payload bytes}`` of one worker's uplink message
    for the compressed buckets, with this step's uplink compressor; {} before any step or
    without hvdcomp's optimizer."""
    exchange = getattr(optimizer, "exchange", None)
    # hvdcomp.optimizer's fused buckets (hvdcomp.optimizer_buckets.BucketReducer)
    buckets = getattr(getattr(optimizer, "_reducer", None), "buckets", None)
    if exchange is None or buckets is None or not exchange.round:
        return {}
    algorithm = exchange.algorithm
    dense = payload = 0
    for bucket in buckets:
        if bucket.exchange is not exchange:
            continue
        numel, dtype = bucket.numel, bucket.params[0].dtype
        uplink = (algorithm.uplink_for(bucket.key) if hasattr(algorithm, "uplink_for")
                  else algorithm.up)
        if getattr(algorithm, "round_kind", None) == "owned":   # its own messages (PowerSGD)
            payload += algorithm.message_nbytes(bucket.key, numel, dtype)
        elif exchange.pattern == "two_phase":
            payload += sum(uplink.payload_nbytes(b - a, dtype) for a, b in
                           exchange.layout(bucket.key) if b > a)
        else:
            payload += uplink.payload_nbytes(numel, dtype)
        dense += numel * bucket.params[0].element_size()
    return {"compression_per_message": dense / payload} if payload else {}
