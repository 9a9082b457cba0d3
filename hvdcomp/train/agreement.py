"""Ranks agree before their first collective: on the settings, and on whether anyone failed.

``hvdcomp train`` is started once per rank, and a wrapper script, a per-node environment or a
typo can give the ranks different options. Settings that change the number, order, names or
shapes of the collectives (batch size, epochs, algorithm, model, ...) would make the ranks wait
for each other for ever; settings that do not (seed, learning rate) would silently train
something nobody asked for. And a rank that fails its own checks (a data directory missing on
one node) would die with its message lost in the launcher's noise.

So, right after the engine starts (``hvd.init()``, or torch.distributed's rendezvous) and before
any other collective, every rank contributes to one allgather (:func:`settle`, through the
engine's communicator): its problem, if it has one, or its settings (the engine among them).
Then, on every rank:

* if some ranks failed, the lowest of them prints its message (``Error (rank 1): ...`` when it
  is not rank 0) and every rank exits with code 2;
* if the settings differ, rank 0 prints one message naming each setting and every rank's value,
  and every rank exits with code 2;
* otherwise training starts.

A rank that fails before this point (a bad option) takes part too, through
:func:`fail_across_ranks`, so the job ends the same way whichever rank found the problem. It
starts the engine the ranks were asked for (``--engine`` as typed, when it can be read) or the
launcher's default (:func:`hvdcomp.train.engine.default_engine`), so that every rank meets the
others in the same library.
"""
from __future__ import annotations

from typing import Any, Dict, NoReturn, Optional

from ..errors import UserError
from ..exchange import config_differences

#: options that may differ between ranks: each node may mount the data at its own path, and
#: progress output is rank 0's alone
MAY_DIFFER = ("data_dir",)
NAME = "hvdcomp.train.agreement"


class RanksDisagree(UserError):
    """Raised on every rank; ``shown`` only on the rank that prints it."""

    def __init__(self, message: str, shown: bool):
        super().__init__(message)
        self.shown = shown


def settings_of(cfg, **facts: Any) -> Dict[str, Any]:
    """What ranks must agree on: every option of ``cfg`` but :data:`MAY_DIFFER`, plus ``facts``
    this rank found (world size, dataset size, the step it resumes from, ...)."""
    from hvdcomp import __version__
    options = {k: v for k, v in cfg.to_dict().items() if k not in MAY_DIFFER}
    return {**options, **facts, "hvdcomp_version": __version__}


def settle(comm, problem: Optional[str], settings: Optional[Dict[str, Any]]) -> None:
    """The one allgather of the module docstring (over the communicator ``comm``, under the
    stall guard); returns only when every rank may go on."""
    rank = comm.rank
    everyone = comm.allgather_object({"problem": problem, "settings": settings}, NAME)
    failed = [(r, entry["problem"]) for r, entry in enumerate(everyone) if entry["problem"]]
    if failed:
        first, message = failed[0]
        raise RanksDisagree(message, shown=rank == first)
    differences = config_differences([entry["settings"] for entry in everyone])
    if differences:
        raise RanksDisagree(
            "ranks were started with different settings, so their collectives cannot pair (or "
            "would train something else on each rank): " + "; ".join(differences)
            + ". Start every rank with the same options", shown=rank == 0)


def fail_across_ranks(message: str, launcher: Dict[str, Any],
                      engine: Optional[str] = None) -> NoReturn:
    """Raise ``message`` as a UserError after the other ranks have heard of it (see the module
    docstring); a lone process, or one where the engine cannot start, raises it at once."""
    if launcher.get("world_size", 1) <= 1 or launcher.get("name") == "single":
        raise UserError(message)
    from .engine import usable_engine, start
    try:
        comm = start(usable_engine(engine, launcher), launcher)
    except Exception:  # noqa: BLE001 - no way to reach the others: say it here, tagged
        raise UserError(message) from None
    settle(comm, message, None)
    raise UserError(message)  # settle always raises when a problem is given
