"""Checking ``hvdcomp.DistributedOptimizer``'s arguments and choosing what exchanges gradients.

Horovod's own checks come first, with Horovod's exception types and messages word for word
(scripts catch them); then what hvdcomp cannot honour with the given compression, one
:class:`OptimizerArgumentError` each, raised before any hook is registered.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .compression import is_stateful
from .errors import UserError

ADASUM = ("op=hvd.Adasum is not supported by hvdcomp.DistributedOptimizer: Adasum combines "
          "gradients by its own rule (its optimizer steps before the allreduce), which neither "
          "a compressor nor error feedback can carry. Keep hvd.DistributedOptimizer(optimizer, "
          "op=hvd.Adasum) for Adasum, or use op=hvd.Average (or hvd.Sum) with hvdcomp")
BF16 = ("parameter(s) {names} are bfloat16, which hvdcomp's algorithms do not exchange (the "
        "small tensors go through Horovod's allreduce, which has no bfloat16): keep the "
        "parameters in float32 and compute in bfloat16 with torch.autocast")


class OptimizerArgumentError(UserError, ValueError):
    """An argument of hvdcomp.DistributedOptimizer that cannot be honoured."""


@dataclass
class Setup:
    names: Dict[Any, str]
    requires_update: List[torch.Tensor]
    compression: Any
    backward_passes_per_step: int
    op: Any
    gradient_predivide_factor: float
    sparse_as_dense: bool
    process_set: Any
    comm: Any
    reducer: Any
    prefix: str


#: hvdcomp's default bucket size: DDP's (``bucket_cap_mb=25``), not Horovod's 64 MiB fusion
#: threshold, so that a ResNet-18-size model (44.7 MB) is two buckets and the first one's uplink
#: starts while backward still runs (docs/design.md, "Buckets and overlap")
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024
#: the first bucket (the last layers, whose gradients backward produces first) is capped smaller,
#: as DDP caps its first bucket at 1 MiB: its exchange starts after the first few layers
DEFAULT_FIRST_BUCKET_BYTES = 1024 * 1024


def refuse_wrapped(optimizer, wrapped) -> None:
    if getattr(type(optimizer), "_hvdcomp_distributed", False):
        raise OptimizerArgumentError(
            "this optimizer is already an hvdcomp.DistributedOptimizer: wrap the torch "
            "optimizer once")
    if type(optimizer).__module__ == "horovod.torch.optimizer":
        raise OptimizerArgumentError(
            "this optimizer is already a horovod DistributedOptimizer: wrap the plain torch "
            "optimizer with hvdcomp.DistributedOptimizer instead of hvd.DistributedOptimizer "
            "(not both: every gradient would be exchanged twice)")
    if optimizer in wrapped:
        raise OptimizerArgumentError(
            "this torch optimizer is already wrapped by an hvdcomp.DistributedOptimizer (whose "
            "gradient hooks stay registered on its parameters): wrap it once and use that wrapper")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OptimizerArgumentError(f"optimizer must be a torch.optim.Optimizer, not "
                                     f"{type(optimizer).__name__}")


def op_name(op) -> str:
    """``"average"`` or ``"sum"`` from Horovod's constants (or those words)."""
    if op is None or op == "average":
        return "average"
    if op == "sum":
        return "sum"
    if op == "adasum":
        raise OptimizerArgumentError(ADASUM)
    try:
        import horovod.torch as hvd
    except Exception:
        hvd = None
    if hvd is not None and not isinstance(op, str):
        if op == hvd.Average:
            return "average"
        if op == hvd.Sum:
            return "sum"
        if op == hvd.Adasum:
            raise OptimizerArgumentError(ADASUM)
    raise OptimizerArgumentError(f"op must be hvd.Average or hvd.Sum (gradients are averaged or "
                                 f"summed over ranks), not {op!r}")


def named_parameter_list(param_groups, named_parameters) -> List[Tuple[str, torch.Tensor]]:
    """Horovod's rules and messages: default names, tuples, unique names, every parameter."""
    if named_parameters is not None:
        named = list(named_parameters)
    else:
        named = [(f"allreduce.noname.{i}.{j}", v) for i, group in enumerate(param_groups)
                 for j, v in enumerate(group["params"])]
    if any(not isinstance(p, tuple) for p in named):
        raise ValueError("named_parameters should be a sequence of "
                         "tuples (name, parameter), usually produced by "
                         "model.named_parameters().")
    seen, dups = set(), set()
    for name, _ in named:
        (dups if name in seen else seen).add(name)
    if dups:
        raise ValueError("Parameter names in named_parameters must be unique. "
                         "Found duplicates: %s" % ", ".join(dups))
    all_ids = {id(v) for group in param_groups for v in group["params"]}
    unnamed = all_ids - {id(v) for _, v in named}
    if unnamed:
        raise ValueError("named_parameters was specified, but one or more model "
                         "parameters were not named. Python object ids: "
                         "%s" % ", ".join(str(i) for i in unnamed))
    return [(n, p) for n, p in named if id(p) in all_ids]


def normalise_groups(groups, num_groups, requires_update) -> Optional[List[Tuple]]:
    """Horovod's ``groups``/``num_groups``: a list of parameter tuples covering every trainable
    parameter (those in no list alone), or None."""
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` "
                      "and will be removed in v0.23.0.", DeprecationWarning)
        if groups is None:
            groups = num_groups
    if groups is None:
        return None
    if not (isinstance(groups, list) or groups > 0):
        raise ValueError("groups should be a non-negative integer or "
                         "a list of list of torch.Tensor.")
    if not isinstance(groups, list):
        n, extra = divmod(len(requires_update), groups)
        split = [requires_update[i * n + min(i, extra):(i + 1) * n + min(i + 1, extra)]
                 for i in range(groups)]
        return [tuple(g) for g in split if g]
    grouped = set()
    for group in groups:
        for p in group:
            if not isinstance(p, torch.Tensor):
                raise ValueError("groups must consist of torch.Tensor.")
            if id(p) in grouped:
                raise ValueError("A parameter can only appear once in groups.")
            grouped.add(id(p))
    trainable = {id(p) for p in requires_update}
    result = [tuple(p for p in group if id(p) in trainable) for group in groups]
    result += [(p,) for p in requires_update if id(p) not in grouped]
    return [g for g in result if g]


def check_horovod_arguments(op, gradient_predivide_factor, backward_passes_per_step) -> str:
    """Horovod's own argument checks, in Horovod's order; returns the op's name."""
    name = op_name(op)
    if gradient_predivide_factor != 1.0 and name != "average":
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    return name


def _communicator(comm, process_set):
    """(comm or None when this rank is outside ``process_set``, world size for Horovod's rule)."""
    if comm is not None:
        if process_set is not None:
            raise OptimizerArgumentError("pass either comm= or process_set=, not both (a "
                                         "communicator already names its ranks)")
        return comm, comm.size
    from .comm.horovod import HorovodCommunicator, _import_horovod
    hvd = _import_horovod()
    if not hvd.is_initialized():
        raise OptimizerArgumentError("Horovod is not initialized: call hvd.init() before "
                                     "hvdcomp.DistributedOptimizer")
    if process_set is not None and not process_set.included():
        return None, hvd.size()
    return HorovodCommunicator(process_set), hvd.size()


def build_setup(optimizer, *, named_parameters, compression, backward_passes_per_step, op,
                gradient_predivide_factor, num_groups, groups, sparse_as_dense, process_set,
                bucket_bytes, small_tensor_bytes, comm, pattern, defaults,
                prefix_for: Callable) -> Setup:
    op = check_horovod_arguments(op, gradient_predivide_factor, backward_passes_per_step)
    named = named_parameter_list(optimizer.param_groups, named_parameters)
    names = {p: n for n, p in sorted(named, key=lambda item: item[0])}
    requires_update = [p for group in optimizer.param_groups for p in group["params"]
                       if p.requires_grad]
    group_list = normalise_groups(groups, num_groups, requires_update)
    trainable = [(n, p) for n, p in named if p.requires_grad]
    stateful = is_stateful(compression)
    _check_options(compression, stateful, gradient_predivide_factor, group_list,
                   bucket_bytes=bucket_bytes, small_tensor_bytes=small_tensor_bytes,
                   pattern=pattern, trainable=trainable)
    comm, world = _communicator(comm, process_set)
    prefix = prefix_for(trainable, comm)
    reducer = None
    if comm is not None and stateful:
        from .optimizer_buckets import BucketReducer
        reducer = BucketReducer(
            compression.build(), comm, trainable, bucket_bytes=bucket_bytes or defaults[0],
            # a given bucket_bytes sizes every bucket; the default caps the first one smaller
            first_bucket_bytes=DEFAULT_FIRST_BUCKET_BYTES if bucket_bytes is None else None,
            small_tensor_bytes=defaults[1] if small_tensor_bytes is None else small_tensor_bytes,
            pattern=pattern, groups=group_list, op_sum=op == "sum",
            sparse_as_dense=sparse_as_dense, names=names, prefix=prefix)
    elif comm is not None and (world > 1 or os.environ.get("HOROVOD_ELASTIC") == "1"):
        # Horovod registers no hooks in a world of one rank: the gradients stay untouched
        from .optimizer_horovod import HorovodReducer
        reducer = HorovodReducer(compression, comm, names, requires_update, op=op,
                                 predivide=gradient_predivide_factor, groups=group_list,
                                 sparse_as_dense=sparse_as_dense, prefix=prefix)
    return Setup(names=names, requires_update=requires_update, compression=compression,
                 backward_passes_per_step=backward_passes_per_step, op=op,
                 gradient_predivide_factor=gradient_predivide_factor,
                 sparse_as_dense=sparse_as_dense, process_set=process_set, comm=comm,
                 reducer=reducer, prefix=prefix)


def _check_options(compression, stateful, predivide, groups, *, bucket_bytes, small_tensor_bytes,
                   pattern, trainable) -> None:
    """What the chosen exchange cannot honour, refused before anything is registered."""
    if not stateful:
        given = [name for name, value in (("bucket_bytes", bucket_bytes), ("pattern", pattern),
                                          ("small_tensor_bytes", small_tensor_bytes))
                 if value is not None]
        if given:
            raise OptimizerArgumentError(
                f"{', '.join(given)} shape(s) hvdcomp's bucketed exchange of its own algorithms "
                f"(Compression.liec(...), Compression.algorithm(...)); with {compression!r} the "
                "gradients go through Horovod's own allreduce, as with hvd.DistributedOptimizer "
                "(its fusion is set by HOROVOD_FUSION_THRESHOLD): drop them")
        return
    if predivide != 1.0:
        raise OptimizerArgumentError(
            "gradient_predivide_factor splits Horovod's allreduce average into a scaling before "
            "and after the sum; hvdcomp's algorithms average decoded payloads themselves, so it "
            f"has no meaning with {compression!r}: leave it at 1.0")
    if groups is not None and bucket_bytes is not None:
        raise OptimizerArgumentError("groups and bucket_bytes both decide which gradients are "
                                     "exchanged together: pass one of them")
    bf16 = [n for n, p in trainable if p.dtype == torch.bfloat16]
    if bf16:
        shown = ", ".join(repr(n) for n in bf16[:3]) + (" ..." if len(bf16) > 3 else "")
        raise OptimizerArgumentError(BF16.format(names=shown))
