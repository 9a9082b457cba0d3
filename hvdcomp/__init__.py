"""hvdcomp: bidirectional gradient compression with error feedback for Horovod (PyTorch).

Layers (each testable alone; see docs/design.md):
  compressors  tensors in, packed uint8 payloads out       hvdcomp.compressors
  algorithms   error feedback as five steps per round      hvdcomp.algorithms
  exchange     the collective pattern (sharded server...)  hvdcomp.exchange
  comm         collectives: Horovod, in-process simulator  hvdcomp.comm
  integration  Horovod Compression / DistributedOptimizer  hvdcomp.optimizer, hvdcomp.compression

The integration names are imported on first use, so ``import hvdcomp`` (and ``hvdcomp --help``)
does not pay for torch and Horovod.
"""
__version__ = "0.1.0"

_LAZY = {
    "DistributedOptimizer": ("hvdcomp.optimizer", "DistributedOptimizer"),
    "Compression": ("hvdcomp.compression", "Compression"),
    "allreduce": ("hvdcomp.tensor_allreduce", "allreduce"),
    "allreduce_async": ("hvdcomp.tensor_allreduce", "allreduce_async"),
    "synchronize": ("hvdcomp.tensor_allreduce", "synchronize"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hvdcomp' has no attribute {name!r}")


__all__ = list(_LAZY)
