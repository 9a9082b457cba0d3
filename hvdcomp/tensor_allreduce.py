"""``hvdcomp.allreduce``: the compressed exchange for one tensor, for custom training loops.

    compression = hvdcomp.Compression.liec("sign")   # once, before the loop: it owns the state
    for step in range(steps):
        ...
        avg = hvdcomp.allreduce(grad, name="layer1.weight", compression=compression)
        # or: handle = hvdcomp.allreduce_async(grad, name="layer1.weight", compression=compression)
        #     avg = hvdcomp.synchronize(handle)

Error feedback is state, so each ``name`` keeps its own algorithm object (built from the first
``compression`` given for it) for the life of the process; call :func:`reset` to drop them. Every
call with a name is one round of that name's algorithm, and every call must pass the *same*
compression object: ``Compression.liec("sign")`` written inside the loop builds a new one each
step, which the second call refuses (ValueError) rather than silently restarting the error
feedback. A compression with Horovod's Compressor
interface (``Compression.fp16``, ``.randomk(r)``, a user's own) is applied as ``hvd.allreduce``
would: ``compress``, average, ``decompress``.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from .compression import AlgorithmCompression, Compression, check_compression, is_stateful
from .exchange import Exchange

_exchanges: Dict[str, Tuple[Any, Exchange]] = {}


_PLAIN_AVERAGE: Dict[str, AlgorithmCompression] = {}


def _plain_average() -> AlgorithmCompression:
    # one object for every name used without compression, so a name's later calls match it
    if "psgd" not in _PLAIN_AVERAGE:
        _PLAIN_AVERAGE["psgd"] = AlgorithmCompression("psgd")
    return _PLAIN_AVERAGE["psgd"]


def _default_comm(comm):
    if comm is None:
        from .comm import HorovodCommunicator
        comm = HorovodCommunicator()
    return comm


def _exchange_for(name: str, compression: Any, comm) -> Exchange:
    known = _exchanges.get(name)
    if known is not None:
        if known[0] is not compression:
            raise ValueError(f"hvdcomp.allreduce: {name!r} was first used with {known[0]!r}; a "
                             "name's error-feedback state belongs to one compression; use "
                             "another name or hvdcomp.tensor_allreduce.reset()")
        return known[1]
    exchange = Exchange(compression.build(), _default_comm(comm))
    _exchanges[name] = (compression, exchange)
    return exchange


class AllreduceHandle:
    def __init__(self, exchange: Exchange, inner, compressor: Any = None, ctx: Any = None):
        self.exchange, self.inner = exchange, inner
        self.compressor, self.ctx = compressor, ctx


def allreduce_async(tensor: torch.Tensor, name: str, compression: Any = None,
                    comm=None) -> AllreduceHandle:
    """Start the compressed average of ``tensor`` over ranks; :func:`synchronize` finishes it."""
    compression = check_compression(compression)
    if not is_stateful(compression) and compression is not Compression.none:
        compressed, ctx = compression.compress(tensor)
        inner = _default_comm(comm).allreduce_async(compressed, f"hvdcomp.{name}", "average")
        return AllreduceHandle(None, inner, compression, ctx)
    if not is_stateful(compression):
        compression = _plain_average()
    exchange = _exchange_for(name, compression, comm)
    return AllreduceHandle(exchange, exchange.start(name, tensor))


def synchronize(handle: AllreduceHandle) -> torch.Tensor:
    if handle.exchange is None:  # a Horovod-style compressor
        return handle.compressor.decompress(handle.inner.wait(), handle.ctx)
    update = handle.exchange.finish(handle.inner)
    handle.exchange.end_round()
    return update


def allreduce(tensor: torch.Tensor, name: str, compression: Any = None, comm=None) -> torch.Tensor:
    """The compressed average of ``tensor`` over ranks (the algorithm's update direction)."""
    return synchronize(allreduce_async(tensor, name, compression, comm))


def reset() -> None:
    """Forget every name's algorithm state."""
    _exchanges.clear()
