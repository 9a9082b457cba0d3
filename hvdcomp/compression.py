"""``hvdcomp.Compression``: compression objects for the ``compression=`` argument.

Two kinds, and the difference matters:

* **Horovod's Compressor interface** (``Compression.none``, ``Compression.fp16``,
  ``Compression.randomk(ratio)``, or a user's own ``compress(tensor) -> (tensor, ctx)`` /
  ``decompress(tensor, ctx)`` object): turns a gradient into a tensor an allreduce may sum.
  ``hvdcomp.DistributedOptimizer`` applies them exactly as ``hvd.DistributedOptimizer`` does, and
  they work with Horovod's own optimizer too.
* **Stateful, bidirectional** (``Compression.liec(...)``, ``.doublesqueeze``, ``.memsgd``,
  ``.ef21``, ``.dgc``, ``.psgd``, or ``Compression.algorithm(name, ...)``): an algorithm with
  error-feedback state and a two-phase exchange. An allreduce cannot carry them, so they only work
  through :func:`hvdcomp.DistributedOptimizer`; handed to Horovod's optimizer, their ``compress``
  raises at the first backward pass with a message saying what to use instead: never a silently
  wrong gradient. (Importing hvdcomp changes nothing in Horovod.)
"""
from __future__ import annotations

import inspect
import zlib
from typing import Any, Dict, Optional

import torch

try:  # Horovod's base class when Horovod is installed, so isinstance checks in user code hold.
    from horovod.torch.compression import Compressor as _HorovodCompressor
    from horovod.torch.compression import FP16Compressor as _HorovodFP16
    from horovod.torch.compression import NoneCompressor as _HorovodNone
except Exception:  # pragma: no cover - hvdcomp's simulator and compressors work without Horovod
    class _HorovodCompressor:  # type: ignore[no-redef]
        """Horovod's interface: compress(tensor) -> (tensor, ctx); decompress(tensor, ctx)."""

        @staticmethod
        def compress(tensor):
            return tensor, None

        @staticmethod
        def decompress(tensor, ctx):
            return tensor

    class _HorovodNone(_HorovodCompressor):  # type: ignore[no-redef]
        pass

    class _HorovodFP16(_HorovodCompressor):  # type: ignore[no-redef]
        """Horovod's FP16Compressor, for runs without Horovod (the simulator)."""

        @staticmethod
        def compress(tensor):
            if tensor.dtype.is_floating_point:
                return tensor.type(torch.float16), tensor.dtype
            return tensor, tensor.dtype

        @staticmethod
        def decompress(tensor, ctx):
            return tensor.type(ctx) if ctx.is_floating_point else tensor

USE_HVDCOMP_OPTIMIZER = (
    "{what} keeps error-feedback state and needs a two-phase exchange, which Horovod's "
    "allreduce cannot carry (this compress() was called by hvd.DistributedOptimizer or "
    "hvd.allreduce): use hvdcomp.DistributedOptimizer(optimizer, "
    "named_parameters=model.named_parameters(), compression={what}) in place of "
    "hvd.DistributedOptimizer, or hvdcomp.allreduce for one tensor")


class RandomKCompressor(_HorovodCompressor):
    """Random-k for Horovod's allreduce: k = ceil(ratio·numel) values at indices every rank draws
    from the same seed, so the values can be summed by an allreduce and only they travel.

    The indices come from ``(seed, numel, n-th call for this numel)``: ranks must compress their
    tensors in the same order (true when every rank runs the same model; Horovod's hooks fire in
    autograd order), and each process needs its own object (in-process simulated ranks too).
    Unscaled (contractive, δ = k/d); without error feedback it is biased — with
    error feedback use ``Compression.memsgd("randomk:ratio=...")`` instead.
    """

    def __init__(self, ratio: float, seed: int = 0):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"randomk ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)
        self.seed = int(seed)
        self._calls: Dict[int, int] = {}

    def _indices(self, numel: int, device) -> torch.Tensor:
        call = self._calls.get(numel, 0)
        self._calls[numel] = call + 1
        k = max(1, int(-(-self.ratio * numel // 1)))
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}.{numel}.{call}".encode()))
        indices = torch.randperm(numel, generator=gen)[:k]   # on the CPU: the same on every rank
        if torch.device(device).type == "cuda":
            # from pinned memory without blocking: a pageable copy would make the host wait
            return indices.pin_memory().to(device, non_blocking=True)
        return indices.to(device)

    def compress(self, tensor):
        flat = tensor.reshape(-1)
        indices = self._indices(flat.numel(), flat.device)
        return flat[indices], (indices, tensor.shape)

    def decompress(self, tensor, ctx):
        indices, shape = ctx
        out = torch.zeros(shape.numel(), dtype=tensor.dtype, device=tensor.device)
        out[indices] = tensor
        return out.reshape(shape)


class AlgorithmCompression(_HorovodCompressor):
    """A recipe for a stateful algorithm: name, compressors and hyperparameters. Each
    :func:`hvdcomp.DistributedOptimizer` builds its own algorithm object from it."""

    stateful = True

    def __init__(self, name: str, up: Any = "none", down: Optional[Any] = None, **hyper: Any):
        from .algorithms import make_algorithm

        self.name, self.up, self.down, self.hyper = name, up, down, hyper
        make_algorithm(name, up=up, down=down, **hyper)  # validate now, where the user wrote it

    def build(self):
        from .algorithms import make_algorithm
        return make_algorithm(self.name, up=self.up, down=self.down, **self.hyper)

    def compress(self, tensor):
        raise TypeError(USE_HVDCOMP_OPTIMIZER.format(what=repr(self)))

    def decompress(self, tensor, ctx):
        raise TypeError(USE_HVDCOMP_OPTIMIZER.format(what=repr(self)))

    def __repr__(self) -> str:
        args = [repr(self.name), f"up={self.up!r}"] + ([f"down={self.down!r}"] if self.down else [])
        args += [f"{k}={v!r}" for k, v in self.hyper.items()]
        return f"Compression.algorithm({', '.join(args)})"


class Compression:
    """Namespace in the style of ``horovod.torch.Compression``."""

    none = _HorovodNone
    fp16 = _HorovodFP16

    @staticmethod
    def randomk(ratio: float, seed: int = 0) -> RandomKCompressor:
        return RandomKCompressor(ratio, seed)

    @staticmethod
    def algorithm(name: str, up: Any = "none", down: Optional[Any] = None,
                  **hyper: Any) -> AlgorithmCompression:
        """Any registered algorithm (``hvdcomp.algorithms.ALGORITHMS``) with its compressors."""
        return AlgorithmCompression(name, up=up, down=down, **hyper)

    @staticmethod
    def psgd() -> AlgorithmCompression:
        return AlgorithmCompression("psgd")

    @staticmethod
    def memsgd(up: Any = "sign") -> AlgorithmCompression:
        return AlgorithmCompression("memsgd", up=up)

    @staticmethod
    def doublesqueeze(up: Any = "sign", down: Optional[Any] = None) -> AlgorithmCompression:
        return AlgorithmCompression("doublesqueeze", up=up, down=down)

    @staticmethod
    def liec(up: Any = "sign", down: Optional[Any] = None,
             period: int = 32) -> AlgorithmCompression:
        return AlgorithmCompression("liec", up=up, down=down, period=period)

    @staticmethod
    def ef21(up: Any = "topk:ratio=0.01", down: Optional[Any] = None,
             **hyper) -> AlgorithmCompression:
        return AlgorithmCompression("ef21", up=up, down=down, **hyper)

    @staticmethod
    def dgc(up: Any = "dgc:ratio=0.001", **hyper) -> AlgorithmCompression:
        return AlgorithmCompression("dgc", up=up, **hyper)

    @staticmethod
    def neolithic(up: Any = "sign", down: Optional[Any] = None,
                  rounds: int = 2) -> AlgorithmCompression:
        return AlgorithmCompression("neolithic", up=up, down=down, rounds=rounds)

    @staticmethod
    def cser(up: Any = "sign", period: int = 8) -> AlgorithmCompression:
        return AlgorithmCompression("cser", up=up, period=period)

    @staticmethod
    def ef21pp(rank: int, up: Any = "topk:ratio=0.01", participation: float = 0.5,
               **hyper) -> AlgorithmCompression:
        """EF21-PP (``hyper``: ``seed``); EF21-W-PP is ``Compression.algorithm("ef21wpp", ...)``."""
        return AlgorithmCompression("ef21pp", up=up, rank=rank, participation=participation,
                                    **hyper)


def _registry_factory(name: str):
    """``Compression.<name>(up=<its default>, down=None, **hyper)`` for a registered algorithm
    that has no hand-written factory above (hvdcomp.algorithms.registry)."""
    from .algorithms import registry

    info = registry.info(name)

    def factory(up: Any = None, down: Optional[Any] = None, **hyper: Any) -> AlgorithmCompression:
        return AlgorithmCompression(name, up=info.up if up is None else up, down=down, **hyper)

    options = ", ".join(f"{o.name} ({o.valid})" for o in info.options) or "none"
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"{info.label}: {info.summary}. Default up: {info.up!r}; options: "
                       f"{options}. Generated from the method's MethodInfo.")
    return staticmethod(factory)


def _add_registry_factories() -> None:
    """One factory per registered five-step algorithm: a new algorithm module gets its
    ``Compression.<name>`` without an edit here (the ones above keep their signatures)."""
    from .algorithms import ALGORITHMS
    for name in ALGORITHMS:
        if name.isidentifier() and not hasattr(Compression, name):
            setattr(Compression, name, _registry_factory(name))


_add_registry_factories()


def is_stateful(compression: Any) -> bool:
    return bool(getattr(compression, "stateful", False))


def check_compression(compression: Any) -> Any:
    """The ``compression=`` of hvdcomp.DistributedOptimizer, checked: None is
    ``Compression.none``; an hvdcomp compressor object (``hvdcomp.compressors``) becomes P-SGD
    with it; anything else must be stateful or have Horovod's Compressor interface."""
    from .compressors import Compressor as HvdcompCompressor
    if compression is None:
        return Compression.none
    if is_stateful(compression):
        return compression
    if isinstance(compression, HvdcompCompressor):
        return AlgorithmCompression("psgd", up=compression)
    if isinstance(compression, str):
        raise TypeError(f"compression={compression!r}: pass a compression object, e.g. "
                        f"hvdcomp.Compression.algorithm('psgd', up={compression!r}) or "
                        f"hvdcomp.Compression.liec({compression!r})")
    if not (callable(getattr(compression, "compress", None))
            and callable(getattr(compression, "decompress", None))):
        raise TypeError(f"compression must be an hvdcomp.Compression object or have Horovod's "
                        f"Compressor interface (compress(tensor) -> (tensor, ctx), "
                        f"decompress(tensor, ctx)); got {compression!r}")
    if inspect.isclass(compression):
        for method in ("compress", "decompress"):
            if not isinstance(inspect.getattr_static(compression, method),
                              (staticmethod, classmethod)):
                raise TypeError(f"{compression.__name__}.{method} is an instance method: pass "
                                f"an instance, {compression.__name__}(...), not the class")
    return compression
