"""hvdcomp: bidirectional gradient compression with error feedback for Horovod (PyTorch).

Layers (each testable alone; see docs/design.md):
  compressors  tensors in, packed uint8 payloads out       hvdcomp.compressors
  algorithms   error feedback as five steps per round      hvdcomp.algorithms
  exchange     the collective pattern (sharded server...)  hvdcomp.exchange
  comm         collectives: Horovod, in-process simulator  hvdcomp.comm
  integration  Horovod Compression / DistributedOptimizer  hvdcomp.optimizer
"""
__version__ = "0.1.0"
