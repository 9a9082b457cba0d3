"""What a run is called and what travels in each direction, from the algorithm's own metadata.

A run's ``config.json`` records the ``down`` compressor the user asked for; MEM-SGD, EF21 and
CSER send their downlink dense whatever it says (their class sets ``compresses_downlink =
False``), and DGC's allgather pattern has no separate downlink at all. The labels here say what
the exchange actually sends, so the summary, ``hvdcomp collect`` and the figures agree with the
byte counters:

    >>> method_name({"algorithm": "liec", "up": "sign", "down": "sign"})
    'LIEC-SGD (sign ↑↓)'
    >>> method_name({"algorithm": "dgc", "up": "dgc:ratio=0.001", "pattern": "allgather"})
    'DGC 0.1 %'
    >>> directions({"algorithm": "memsgd", "up": "topk:ratio=0.01", "down": "topk:ratio=0.01"})
    'up top-k 1 %, down dense 32-bit'
"""
from __future__ import annotations

from typing import Any, Dict, Optional

#: The names the methods' papers use.
DISPLAY_NAMES = {
    "psgd": "P-SGD", "liec": "LIEC-SGD", "dgc": "DGC", "memsgd": "MEM-SGD",
    "doublesqueeze": "DoubleSqueeze", "ef21": "EF21", "ef21w": "EF21-W", "ef21sgdm": "EF21-SGDM",
    "ef21bc": "EF21-BC", "ef21pp": "EF21-PP", "ef21wpp": "EF21-W-PP", "neolithic": "NEOLITHIC",
    "multiround": "multi-round", "cser": "CSER", "monna": "MoNNA",
}
DENSE = "dense 32-bit"
#: MoNNA's aggregators as its paper writes them.
AGGREGATORS = {"nna": "NNA", "trimmed_mean": "trimmed mean", "krum": "Krum", "rfa": "RFA",
               "cclip": "CClip"}


def _declared(algorithm: str):
    """The method's MethodInfo from the registry, or None (unknown, or torch missing here)."""
    try:
        from .algorithms import registry
        return registry.info(algorithm)
    except Exception:  # noqa: BLE001 - a laptop reading runs without torch: the record alone
        return None


def _percent(fraction: Any) -> str:
    return f"{100 * float(fraction):g} %"


def _compressor_config(spec: str) -> Dict[str, Any]:
    """Every parameter of a compressor spec, defaults included (``{"name": ...}`` alone for a
    spec this version cannot parse, e.g. from a newer run)."""
    try:
        from .compressors import from_spec
        return dict(from_spec(spec).config())
    except Exception:  # noqa: BLE001 - a label must never stop a table; show the name as written
        return {"name": spec.partition(":")[0]}


def compressor_label(spec: Optional[str]) -> str:
    """A compressor spec in a few words: ``topk:ratio=0.01`` -> ``top-k 1 %``."""
    if spec is None or str(spec).strip() in ("", "none"):
        return DENSE
    config = _compressor_config(str(spec))
    name = config.get("name", str(spec))
    if name in ("topk", "randomk", "dgc") and "ratio" in config:
        short = {"topk": "top-k", "randomk": "rand-k", "dgc": "DGC"}[name]
        return f"{short} {_percent(config['ratio'])}"
    if name == "qsgd" and "levels" in config:
        return f"QSGD {config['levels']} levels"
    if name == "powersgd" and "rank" in config:
        return f"PowerSGD rank {config['rank']}"
    if name == "blocksign":
        return f"block sign {config.get('block', '')}".strip()
    if name == "chunksign":
        return "chunk sign"
    return str(name)


def sends_downlink(config: Dict[str, Any]) -> bool:
    """False when the server's reply is not a message of its own: DGC's allgather pattern (each
    rank receives the others' uplink payloads) and MoNNA (models exchanged as a whole)."""
    return config.get("pattern") != "allgather" and config.get("algorithm") != "monna"


def downlink_spec(config: Dict[str, Any]) -> str:
    """The compressor that really carries the downlink: ``none`` when the algorithm's class
    sends it dense whatever ``down`` asked (``Algorithm.compresses_downlink``)."""
    down = config.get("down") or "none"
    try:
        from .algorithms import ALGORITHMS
    except Exception:  # noqa: BLE001 - torch missing on a laptop reading runs: trust the record
        return str(down)
    cls = ALGORITHMS.get(str(config.get("algorithm", "")))
    if cls is not None and not cls.compresses_downlink:
        return "none"
    return str(down)


def directions(config: Dict[str, Any]) -> str:
    """``up sign, down sign`` / ``up top-k 1 %, down dense 32-bit`` /
    ``up DGC 0.1 %, allgathered: ...``."""
    declared = _declared(str(config.get("algorithm", "")))
    if declared is not None and declared.travels:   # messages of its own (PowerSGD's factors)
        return declared.describe(declared.travels, config.get("algorithm_options") or {})
    up = f"up {compressor_label(config.get('up'))}"
    if not sends_downlink(config):
        if config.get("pattern") == "allgather":
            return f"{up}, allgathered: each rank receives the others' uplink messages"
        return f"{up}, whole models exchanged"
    return f"{up}, down {compressor_label(downlink_spec(config))}"


def method_name(config: Dict[str, Any]) -> str:
    """A short name for legends and tables: the paper's name of the algorithm, then what it
    compresses, with arrows for the directions (↑ up, ↓ down)."""
    algorithm = str(config.get("algorithm", "?"))
    declared = _declared(algorithm)
    if declared is not None and declared.legend:
        return declared.describe(declared.legend, config.get("algorithm_options") or {})
    name = DISPLAY_NAMES.get(algorithm) or (declared.label if declared else algorithm)
    if algorithm == "monna":   # whole models, uncompressed: what differs is how they are merged
        options = config.get("algorithm_options") or {}
        aggregator = str(options.get("aggregator", "nna"))
        attack = f", {options['attack']} attack" if options.get("attack") else ""
        return f"{name} ({AGGREGATORS.get(aggregator, aggregator)}{attack})"
    up_spec = str(config.get("up") or "none")
    up = compressor_label(up_spec)
    down = compressor_label(downlink_spec(config)) if sends_downlink(config) else None
    if algorithm == "dgc" and up.startswith("DGC "):
        # the paper's own way of naming a run: its density
        return up if down in (None, DENSE) else f"{up} ({down} ↓)"
    if up == DENSE and down in (None, DENSE):
        return name
    if down is None or down == DENSE:
        return f"{name} ({up} ↑)"
    if up == down:
        return f"{name} ({up} ↑↓)"
    if up == DENSE:
        return f"{name} ({down} ↓)"
    return f"{name} ({up} ↑, {down} ↓)"
