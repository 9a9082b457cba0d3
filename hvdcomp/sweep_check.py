"""Check sweep values the way ``hvdcomp train`` will check them in the job, before anything
reaches the queue.

A sweep spec's values travel to ``hvdcomp train`` on the cluster as command-line arguments. This
module runs train's own checks on those very arguments at render time, so that a misspelt
algorithm, a compressor parameter out of range or a negative learning rate stops
``hvdcomp slurm render``/``submit`` instead of failing a job after it queued:

1. Click parses the arguments with train's own command (its types and choices);
2. the options become a :class:`hvdcomp.train.config.TrainConfig` as train builds it, and
   ``TrainConfig.resolved()`` checks ranges, the algorithm and the compressor specs;
3. train's ``_validated`` checks the model name, the dataset, and the algorithm's own
   hyperparameters for the point's number of ranks. Two things are left to the job, because the
   machine that renders is not the one that trains: whether CUDA is there (``device = "cuda"``
   is checked as if it were), and whether a ``data-dir`` holds the dataset's files — unless the
   spec says ``[cluster] data-local = true`` (the folders are visible here too), when they are
   checked, relative paths taken from the job's working directory.

Values are checked one at a time first (so every bad value is reported, each at its own line),
then each point as a whole (combinations such as ``algorithm = "monna"`` with a compressor).
When train does not import here (a login node without torch) nothing beyond the option types is
checked, and :attr:`TrainValidator.reason` says why.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .sweep import SweepPoint, train_arguments
from .sweep_options import RANKS_KEY, TrainOptions

if TYPE_CHECKING:
    from .sweep import _ValueSite
    from .sweep_problems import SpecContext

#: Datasets read from files under --data-dir (the others are built in memory).
FILE_DATASETS = ("cifar10", "cifar100", "tinyimagenet")


class TrainValidator:
    """train's own checks, applied to the arguments a sweep point passes to ``hvdcomp train``."""

    def __init__(self, data_local: bool = False, workdir: "str | Path | None" = None):
        self.data_local = data_local
        self.workdir = Path(workdir) if workdir is not None else Path.cwd()
        self.reason = ""
        try:
            from hvdcomp.cli import train as train_cli
            from hvdcomp.train import config as train_config
            from hvdcomp.train import data as train_data
            self._cli, self._config, self._data = train_cli, train_config, train_data
            self._cli._validated  # noqa: B018 - fail here, not per value, if train changed
        except Exception as exc:  # noqa: BLE001 - any import failure: values checked for type only
            self._cli = None
            self.reason = f"hvdcomp train does not import here ({type(exc).__name__}: {exc})"

    @property
    def available(self) -> bool:
        return self._cli is not None

    # ------------------------------------------------------------------------------------------
    def check_arguments(self, args: List[str], ranks: int = 1, whole_point: bool = True
                        ) -> Optional[str]:
        """The problem train would report for ``hvdcomp train ARGS`` on ``ranks`` ranks, or None.

        ``whole_point=False`` checks one option on its own: what depends on other options (the
        dataset's files need ``data-dir``) is left to the check of the whole point."""
        if not self.available:
            return None
        import click

        from hvdcomp.errors import UserError
        try:
            # click.Command's own parsing: train's override would tell the other ranks of a
            # job, and render is no rank of one (inside an allocation it could seem to be)
            params = click.Command.make_context(self._cli.command, "train", list(args)).params
            cfg = self._config_from(params).resolved()
            cfg = self._validated(cfg, ranks, whole_point)
        except click.UsageError as exc:
            return " ".join(exc.format_message().split())
        except (UserError, ValueError, TypeError) as exc:  # ConfigError, DataError, spec errors
            return str(exc)
        del cfg
        return None

    def _config_from(self, params: Dict[str, Any]):
        """TrainConfig from Click's parameters, exactly as the train command builds it."""
        fields = {f.name for f in dataclasses.fields(self._config.TrainConfig)}
        kwargs = {name: value for name, value in params.items() if name in fields}
        kwargs["up"] = params.get("up") or params.get("compressor")
        kwargs["algorithm_options"] = self._config.parse_key_values(
            params.get("algorithm_options") or ())
        kwargs["schedule"] = str(params["schedule"]).strip().lower()
        kwargs["milestones"] = self._cli._fractions(params["milestones"])
        return self._config.TrainConfig(**kwargs)

    def _validated(self, cfg, ranks: int, whole_point: bool):
        """train's ``_validated`` with what only the job's machine can know set aside; for one
        option on its own, only the checks that need no other option (model and dataset)."""
        if not whole_point:
            from hvdcomp.train.models import check_model_name
            cfg.model = check_model_name(cfg.model)
            name, options = self._data.parse_dataset_spec(cfg.dataset)
            if name not in FILE_DATASETS or options:   # files need data-dir: the point's check
                self._data.check_dataset(cfg.dataset, None)
            return cfg
        device, dataset, data_dir = cfg.device, cfg.dataset, cfg.data_dir
        cfg.device = "cpu"  # CUDA is checked where the job runs
        name, options = self._data.parse_dataset_spec(cfg.dataset)
        if name in FILE_DATASETS and not options and data_dir:
            if self.data_local:
                cfg.data_dir = str(self.workdir / Path(data_dir).expanduser())
            else:
                # files unchecked here (train's check would look for them on this machine);
                # digits is an image set like these, for the checks that follow
                cfg.dataset = "digits"
        try:
            cfg = self._cli._validated(cfg, {"world_size": ranks, "rank": 0})
        finally:
            cfg.device, cfg.dataset, cfg.data_dir = device, dataset, data_dir
        return cfg


# ----------------------------------------------------------------------------------------------
# Reporting: every bad value at its line, then every bad combination once
# ----------------------------------------------------------------------------------------------

def option_arguments(options_table: TrainOptions, values: Mapping[str, Any]) -> List[str]:
    """``hvdcomp train`` arguments for some train options (no ``ranks``), in a fixed order."""
    point = SweepPoint("check", 1, {k: v for k, v in values.items() if k != RANKS_KEY}, {})
    return train_arguments(point, options_table)


def check_values(ctx: SpecContext, validator, sites: Sequence[_ValueSite],
                  points: Sequence[SweepPoint], origins: Sequence[Optional[int]],
                  options: TrainOptions, keys: Sequence[str]) -> None:
    """Each value on its own, at its own line; then, when all are fine, each point as a whole
    (a combination train refuses is reported once, at the first key whose removal cures it)."""
    for site in sites:
        if site.canonical == RANKS_KEY:
            continue
        problem = validator.check_arguments(
            option_arguments(options, {site.canonical: site.value}), whole_point=False)
        if problem:
            ctx.report(site.table, site.locate, site.prefix + problem)
    if ctx.problems:
        return
    failing: Dict[Tuple[Tuple[str, ...], Optional[str], str], List[str]] = {}
    for point, origin in zip(points, origins):
        problem = validator.check_arguments(option_arguments(options, point.options), point.ranks)
        if problem:
            table, key = _culprit(validator, point, origin, problem, options, keys)
            failing.setdefault((table, key, problem), []).append(point.name)
    for (table, key, problem), names in failing.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        label = "point" if len(names) == 1 else f"{len(names)} points"
        ctx.report(table, key, f"{label} {shown}: {problem}")


def _culprit(validator, point: SweepPoint, origin: Optional[int], problem: str,
             options: TrainOptions, keys: Sequence[str]) -> Tuple[Tuple[str, ...], Optional[str]]:
    """Where to point at for a point-level problem: the include entry it came from, else the
    first matrix key, then [train] key, without which train would not say ``problem``."""
    if origin is not None:
        return ("matrix",), "include"
    candidates = [("matrix", k) for k in keys if k != RANKS_KEY] + \
                 [("train", k) for k in point.options if k not in point.varied]
    # keys the message names (train says "--data-dir ...") first
    candidates.sort(key=lambda candidate: f"--{candidate[1]}" not in problem)
    for table, key in candidates:
        rest = {k: v for k, v in point.options.items() if k != key}
        if validator.check_arguments(option_arguments(options, rest), point.ranks) != problem:
            return (table,), key
    return ("matrix",), None
