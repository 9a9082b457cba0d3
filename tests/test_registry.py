"""The registry of training methods (hvdcomp/algorithms/registry.py) and what is derived from it."""
from __future__ import annotations

from pathlib import Path

import pytest

from hvdcomp.algorithms import ALGORITHMS, registry
from hvdcomp.train import config

DOC = Path(__file__).resolve().parents[1] / "docs" / "algorithms.md"


def test_docs_table_is_the_registrys():
    page = DOC.read_text(encoding="utf-8")
    assert registry.page_with_table(page) == page, (
        "docs/algorithms.md's table is out of date: python -m hvdcomp.algorithms.registry --write")


def test_every_method_declares_its_info_and_five_step_ones_are_algorithms():
    names = registry.names()
    assert set(ALGORITHMS) <= set(names)
    assert {"monna", "powersgd_ef"} <= set(names)
    for name in names:
        info = registry.info(name)
        assert info.name == name and info.label and info.summary
        for option in info.options:
            assert option.valid, (name, option.name)


def test_train_tables_come_from_the_registry():
    assert config.ALGORITHMS == tuple(registry.names())
    assert config.DEFAULT_UP["dgc"] == "dgc:ratio=0.001"
    assert config.DEFAULT_DOWN["memsgd"] == "none" and config.DEFAULT_DOWN["liec"] == "sign"
    assert config.DEFAULT_PATTERN == {"dgc": "allgather", "powersgd_ef": "allreduce"}
    assert config.PAPER_SGD_MOMENTUM == {"psgd": 0.9, "powersgd_ef": 0.9}
    assert set(config.MOMENTUM_INSIDE) == {"dgc", "ef21sgdm", "monna"}


def test_cli_help_lists_every_method():
    from click.testing import CliRunner
    from hvdcomp.cli.train import command
    text = " ".join(CliRunner().invoke(command, ["--help"]).output.split())
    for name in registry.names():
        assert name in text


def test_unknown_method_names_the_choices_and_the_powersgd_compressor():
    with pytest.raises(config.ConfigError, match="powersgd_ef"):
        config.TrainConfig(algorithm="powersgd").resolved()


def test_methods_that_take_no_compressor_refuse_one():
    for name in ("monna", "powersgd_ef"):
        with pytest.raises(config.ConfigError, match="drop --compressor"):
            config.TrainConfig(algorithm=name, up="sign").resolved()
        assert config.TrainConfig(algorithm=name).resolved().up == "none"


def test_sweep_validation_knows_every_registered_method():
    """Sweep specs are checked by train's own checks, so they follow the registry too."""
    from hvdcomp.sweep_check import TrainValidator
    validator = TrainValidator()
    assert validator.check_arguments(["--algorithm", "powersgd_ef", "--algorithm-option",
                                      "rank=2"], ranks=2) is None
    problem = validator.check_arguments(["--algorithm", "powersgd_ef", "--compressor", "sign"],
                                        ranks=2)
    assert "own rank-r factors" in problem
    problem = validator.check_arguments(["--algorithm", "powersgd_ef", "--algorithm-option",
                                         "rank=0"], ranks=2)
    assert "rank must be an integer >= 1" in problem


def test_compression_has_a_factory_for_every_algorithm():
    from hvdcomp import Compression
    from hvdcomp.algorithms import ALGORITHMS
    for name in ALGORITHMS:
        assert callable(getattr(Compression, name)), name
    built = Compression.powersgd_ef(rank=2).build()
    assert built.config()["rank"] == 2 and built.up.spec() == "none"


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_reset_state_gives_a_fresh_algorithms_state(name):
    """reset_state (load_state_dict(..., reset_error_feedback=True)) empties exactly the declared
    state_fields and the round counter: the state_dict of a fresh algorithm."""
    import torch
    from hvdcomp.algorithms import make_algorithm
    up = "none" if ALGORITHMS[name].info.compressors_refused else \
        "topk:ratio=0.5" if name == "dgc" else "sign"
    options = {"ef21pp": {"rank": 0}, "ef21w": {"smoothness": [1.0, 2.0], "rank": 0},
               "ef21wpp": {"smoothness": [1.0, 2.0], "rank": 0}}.get(name, {})
    used, fresh = (make_algorithm(name, up=up, **options) for _ in range(2))
    for attr in used.state_fields:
        getattr(used, attr)["bucket"] = torch.ones(3)
    used.step = 7
    used.reset_state()
    assert used.state_dict() == fresh.state_dict()
