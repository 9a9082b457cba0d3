"""One registry of training methods: what each one is, declared on its own class.

Every method ``hvdcomp train`` and ``hvdcomp.Compression`` know declares a :class:`MethodInfo`
as its class attribute ``info`` (name, paper, default compressors and pattern, where momentum
lives, the paper's SGD settings, its options with types and ranges), and subclasses
:class:`TrainingMethod`, whose hooks say what a training run fills in for it. Registration is a
side effect of defining the class (``__init_subclass__``, as Bagua's one-call registry registers
an algorithm with its description); :func:`load_all` imports every module of
:mod:`hvdcomp.algorithms`, so adding a method is adding one module there.

Everything that used to be a hand-written table reads this registry instead: the defaults and
checks of :mod:`hvdcomp.train.config`, the ``--algorithm`` help of ``hvdcomp train``, the
factories of :class:`hvdcomp.Compression` and the table in docs/algorithms.md
(:func:`markdown_table`; ``tests/test_registry.py`` keeps the page equal to it).

Two kinds of method share the interface:

* five-step algorithms (:class:`hvdcomp.algorithms.base.Algorithm`): the exchange drives them
  inside :class:`hvdcomp.DistributedOptimizer`;
* methods that own their exchange (MoNNA: models, not gradients): :meth:`TrainingMethod.train_step`
  returns the object the training loop steps instead of a distributed optimizer.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type


@dataclass(frozen=True)
class Paper:
    """Where a method comes from."""

    title: str
    authors: str
    year: int
    link: str
    venue: str = ""


@dataclass(frozen=True)
class Option:
    """One hyperparameter a method takes (``--algorithm-option NAME=VALUE``).

    ``valid`` says the accepted values in words (the method's constructor checks them);
    ``filled_by_train`` marks options ``hvdcomp train`` fills itself (a rank, a seed, a count of
    steps) so a user need not give them."""

    name: str
    type: str
    default: Any
    valid: str
    help: str = ""
    filled_by_train: bool = False


@dataclass(frozen=True)
class MethodInfo:
    """What a method is and what ``hvdcomp train`` uses by default (see the module docstring).

    ``up``/``down``: default compressor specs (``down=None``: the uplink's, or ``none`` when the
    method sends its downlink dense); ``pattern``: default exchange pattern (None: the
    optimizer's, ``two_phase``); ``compressors_refused``: for a method that takes no compressor,
    why (MoNNA exchanges whole models; PowerSGD has its own factors); ``momentum_inside``: the
    update carries the method's own momentum, so the wrapped SGD defaults to 0;
    ``sgd_momentum``: the SGD momentum its paper ran (applied when ``--momentum`` is not given);
    ``paper_lr``: the paper's learning rate where it gives one (documentation only; ``--lr``
    keeps its default).
    ``legend``/``travels``: for a method whose messages are not its compressors' (PowerSGD's
    factors), its name in legends and what travels, as format strings over its options
    (``"PowerSGD rank {rank}"``; :mod:`hvdcomp.labels`).
    ``order``: position in listings (CLI help, error messages, the docs' table)."""

    name: str
    label: str
    summary: str
    paper: Optional[Paper] = None
    up: str = "sign"
    down: Optional[str] = None
    pattern: Optional[str] = None
    compressors_refused: str = ""
    momentum_inside: bool = False
    sgd_momentum: float = 0.0
    paper_lr: Optional[float] = None
    options: Tuple[Option, ...] = ()
    legend: str = ""
    travels: str = ""
    order: int = 100

    def describe(self, template: str, options: Dict[str, Any]) -> str:
        """``template`` filled with the options' defaults overridden by ``options``."""
        values = {o.name: o.default for o in self.options}
        values.update(options or {})
        return template.format(**values)

    def option(self, name: str) -> Optional[Option]:
        return next((o for o in self.options if o.name == name), None)


class TrainingMethod:
    """The interface every registered method has; the defaults fit a five-step algorithm."""

    #: set by each registered class (a class without its own ``info`` is not registered)
    info: ClassVar[MethodInfo]
    #: whether the downlink is compressed at all (five-step algorithms override)
    compresses_downlink: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "info" in cls.__dict__:
            register(cls)

    # --- what a training run fills in, checks and builds ----------------------------------------
    @classmethod
    def train_options(cls, cfg, world_size: int, rank: int,
                      steps_per_epoch: Optional[int]) -> Dict[str, Any]:
        """The method's hyperparameters for a ``hvdcomp train`` run: ``cfg.algorithm_options``
        plus what the run knows and the user need not type (this rank, the seed, ...).
        Raises ValueError for a combination the method cannot honour."""
        return dict(cfg.algorithm_options)

    @classmethod
    def check_train(cls, cfg, world_size: int, rank: int) -> None:
        """Raise ValueError for options this method refuses; called on every rank before
        ``hvd.init``. Five-step algorithms are checked by building their compression."""
        from hvdcomp.compression import Compression
        Compression.algorithm(cfg.algorithm, up=cfg.up, down=cfg.down,
                              **cls.train_options(cfg, world_size, rank, 1))

    @classmethod
    def train_step(cls, model, cfg, comm) -> Optional[Any]:
        """For a method that owns its exchange: the object the training loop steps in place of a
        distributed optimizer (``zero_grad``, ``set_lr``, ``step``, ``counters``, ...). None:
        the method runs inside :class:`hvdcomp.DistributedOptimizer`."""
        return None

    @classmethod
    def sends_dense(cls, parameter, options: Dict[str, Any]) -> bool:
        """Whether the method sends this parameter's gradient dense inside its buckets (DGC per
        layer: dim ≤ 1), beyond the optimizer's small tensors."""
        return False

    @classmethod
    def dense_tensor_momentum(cls, options: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """SGD options for the tensors the method sends dense, when its momentum lives inside
        the compressed update (:mod:`hvdcomp.train.uncompressed`); None: like the others."""
        return None


#: every registered method by name (filled when its class is defined)
METHODS: Dict[str, Type[TrainingMethod]] = {}


def register(cls: Type[TrainingMethod]) -> Type[TrainingMethod]:
    """Register ``cls`` under ``cls.info.name`` (defining the class does this)."""
    info = cls.__dict__["info"]
    if not isinstance(info, MethodInfo):
        raise TypeError(f"{cls.__name__}.info must be a MethodInfo, not {type(info).__name__}")
    other = METHODS.get(info.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"two methods are called {info.name!r}: {other.__qualname__} and "
                         f"{cls.__qualname__}")
    METHODS[info.name] = cls
    return cls


def load_all() -> Dict[str, Type[TrainingMethod]]:
    """Import every module of :mod:`hvdcomp.algorithms` (each registers its methods)."""
    package = importlib.import_module("hvdcomp.algorithms")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return METHODS


def names() -> List[str]:
    """Registered method names in listing order."""
    load_all()
    return sorted(METHODS, key=lambda name: (METHODS[name].info.order, name))


def method(name: str) -> Type[TrainingMethod]:
    """The class registered as ``name``; ValueError naming the choices otherwise."""
    load_all()
    if name not in METHODS:
        hint = ""
        if name == "powersgd":
            hint = (" (powersgd is a compressor, --compressor powersgd:rank=R; the PowerSGD "
                    "method of Vogels et al. is --algorithm powersgd_ef)")
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {', '.join(names())}"
                         f"{hint}")
    return METHODS[name]


def info(name: str) -> MethodInfo:
    return method(name).info


def default_down(name: str, up: str) -> str:
    """The downlink compressor when none is given: the declared one, else ``none`` for a
    dense-downlink method, else the uplink's."""
    declared = info(name)
    if declared.down is not None:
        return declared.down
    return up if METHODS[name].compresses_downlink else "none"


# --- what is derived from the registry ----------------------------------------------------------
def cli_help() -> str:
    """The ``--algorithm`` help of ``hvdcomp train``."""
    return " | ".join(names())


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _options_cell(declared: MethodInfo) -> str:
    shown = [f"`{o.name}`={o.default!r}" if not o.filled_by_train else f"`{o.name}` (train fills)"
             for o in declared.options]
    return ", ".join(shown) if shown else "—"


def _paper_cell(paper: Optional[Paper]) -> str:
    if paper is None:
        return "—"
    return f"[{_cell(paper.authors)} {paper.year}]({paper.link})"


TABLE_BEGIN = "<!-- registry-table: begin (python -m hvdcomp.algorithms.registry --write) -->"
TABLE_END = "<!-- registry-table: end -->"


def page_with_table(page: str) -> str:
    """``page`` (docs/algorithms.md) with the text between its table markers replaced by
    :func:`markdown_table`."""
    head, found, rest = page.partition(TABLE_BEGIN)
    _, found_end, tail = rest.partition(TABLE_END)
    if not (found and found_end):
        raise ValueError(f"the page has no {TABLE_BEGIN!r} ... {TABLE_END!r} markers")
    return f"{head}{TABLE_BEGIN}\n{markdown_table()}\n{TABLE_END}{tail}"


def markdown_table() -> str:
    """The summary table of docs/algorithms.md (between its ``registry-table`` markers)."""
    rows = ["| `--algorithm` | Method | Paper | up / down (default) | pattern | SGD momentum "
            "(default) | Options |",
            "|---|---|---|---|---|---|---|"]
    for name in names():
        declared = METHODS[name].info
        if not declared.compressors_refused:
            compressors = f"`{declared.up}` / `{default_down(name, declared.up)}`"
        else:
            compressors = "— (its own)"
        momentum = "inside the method" if declared.momentum_inside else \
            f"{declared.sgd_momentum:g}"
        rows.append(f"| `{name}` | {_cell(declared.label)} | {_paper_cell(declared.paper)} | "
                    f"{compressors} | {declared.pattern or 'two_phase'} | {momentum} | "
                    f"{_options_cell(declared)} |")
    return "\n".join(rows)


def main(argv: List[str]) -> None:
    """``python -m hvdcomp.algorithms.registry [--write [PAGE]]``: print the table, or rewrite
    it in PAGE (docs/algorithms.md)."""
    from pathlib import Path

    from hvdcomp.algorithms import registry   # the package's module, where classes registered
    if argv[:1] == ["--write"]:
        target = Path(argv[1] if len(argv) > 1 else "docs/algorithms.md")
        text = registry.page_with_table(target.read_text(encoding="utf-8"))
        target.write_text(text, encoding="utf-8")
    else:
        print(registry.markdown_table())


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
