"""``hvdcomp train``'s defaults give each paper's method (issue 13 items 1 and 2).

* SGD momentum defaults to what each paper ran: 0.9 for the dense baseline psgd only; LIEC-SGD, its
  baselines and the EF21 family run plain SGD; DGC and EF21-SGDM carry their momentum inside.
* The tensors DGC and EF21-SGDM send dense (under ``small_tensor_bytes``, or of dim ≤ 1 for DGC
  per layer) get the method's momentum in their own SGD parameter group; the equivalences with
  the reference update rules are checked step by step below.
* The summary prints the settings and both compression figures.
"""
from __future__ import annotations

import io

import pytest
import torch

from hvdcomp.train.config import ALGORITHMS, TrainConfig
from hvdcomp.train.loop import make_compression
from hvdcomp.train.results import print_summary
from hvdcomp.train.uncompressed import (describe_momentum, parameter_groups,
                                       uncompressed_group_options)


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "monna"])
def test_sgd_momentum_defaults_to_the_papers(algorithm):
    cfg = TrainConfig(algorithm=algorithm).resolved()
    # PowerSGD's paper (its Algorithm 2) applies momentum 0.9 after decompression
    assert cfg.momentum == (0.9 if algorithm in ("psgd", "powersgd_ef") else 0.0)
    # any other value is the user's explicit choice, kept as given
    assert TrainConfig(algorithm=algorithm, momentum=0.5).resolved().momentum == 0.5


def test_dgc_defaults_are_the_papers():
    cfg = TrainConfig(algorithm="dgc").resolved()
    assert (cfg.up, cfg.down, cfg.pattern) == ("dgc:ratio=0.001,sample_ratio=0.01", "none",
                                               "allgather")
    algo = make_compression(cfg, 2, 0, steps_per_epoch_=10).build()
    assert algo.per_layer and algo.momentum_factor == 0.9 and algo.warmup_epochs == 4


def test_dgc_per_layer_refuses_the_two_phase_pattern_up_front():
    cfg = TrainConfig(algorithm="dgc", pattern="two_phase").resolved()
    with pytest.raises(ValueError, match="--pattern allgather"):
        make_compression(cfg, 2, 0)
    off = TrainConfig(algorithm="dgc", pattern="two_phase",
                      algorithm_options={"per_layer": False}).resolved()
    assert make_compression(off, 2, 0).build().per_layer is False


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))


def group_of(groups, parameter):
    return next(g for g in groups if any(p is parameter for p in g["params"]))


def test_dgc_gives_its_momentum_to_every_tensor_it_sends_dense():
    model = mlp()
    cfg = TrainConfig(algorithm="dgc").resolved()
    groups = parameter_groups(model, cfg, small_tensor_bytes=4096)
    first, _, second, _, out = model
    # 128×64 and 64×128 weights are compressed; the 10×64 weight (2560 B) and every bias travel
    # dense: under 4096 bytes, or of dim 1 (per layer)
    for p in (first.weight, second.weight):
        assert "momentum" not in group_of(groups, p)          # --momentum: 0
    for p in (out.weight, out.bias, first.bias, second.bias):
        assert group_of(groups, p)["momentum"] == 0.9
    nesterov = TrainConfig(algorithm="dgc", algorithm_options={"momentum": 0.8,
                                                                "nesterov": True}).resolved()
    dense = group_of(parameter_groups(model, nesterov, 4096), out.bias)
    assert (dense["momentum"], dense["nesterov"]) == (0.8, True)
    # LIEC-SGD and the others: one group, the SGD of --momentum
    assert len(parameter_groups(model, TrainConfig().resolved(), 4096)) == 1


def run_sgd(group_options, grads, lr=0.1):
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.SGD([{"params": [w], **group_options}], lr=lr)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach()


GRADS = [torch.tensor(v, dtype=torch.float64) for v in
         ([1.0, -2.0, 0.5], [0.5, 1.0, -1.0], [-1.0, 0.25, 2.0], [2.0, 2.0, 2.0])]


def test_dgc_dense_group_is_the_references_compensate():
    """Reference ``DGCSGDMemory.compensate(G, accumulate=False)``: u ← m·u + G (u⁰ = 0), and the
    optimizer steps w ← w − lr·u."""
    m, lr = 0.9, 0.1
    u, w = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for g in GRADS:
        u = m * u + g
        w = w - lr * u
    cfg = TrainConfig(algorithm="dgc").resolved()
    torch.testing.assert_close(run_sgd(uncompressed_group_options(cfg), GRADS, lr), w,
                               rtol=0, atol=1e-15)


def test_ef21sgdm_dense_group_is_its_estimator():
    """EF21-SGDM's v ← (1 − η)·v + η·g with v⁰ = g⁰, stepped w ← w − lr·v."""
    eta, lr = 0.25, 0.1
    v, w = None, torch.zeros(3, dtype=torch.float64)
    for g in GRADS:
        v = g.clone() if v is None else (1 - eta) * v + eta * g
        w = w - lr * v
    cfg = TrainConfig(algorithm="ef21sgdm", algorithm_options={"eta": eta}).resolved()
    torch.testing.assert_close(run_sgd(uncompressed_group_options(cfg), GRADS, lr), w,
                               rtol=0, atol=1e-15)


def test_summary_prints_the_settings_and_both_compression_figures():
    config = {"algorithm": "dgc", "up": "dgc:ratio=0.001", "down": "none", "model": "mlp",
              "dataset": "digits", "world_size": 2, "launcher": "mpirun", "lr": 0.1,
              "momentum": 0.0, "nesterov": False, "weight_decay": 5e-4,
              "algorithm_options": {"per_layer": True}}
    summary = {"final_accuracy": 0.9, "best_accuracy": 0.91, "steps": 10, "epochs": 1,
               "wall_time": 1.0, "samples_per_s": 100, "time_compute": 0.5, "time_compress": 0.1,
               "time_comm": 0.2, "bytes_up": 1000, "bytes_down": 0, "compression_ratio": 13.6,
               "compression_per_message": 512.0, "run_dir": "runs/x"}
    out = io.StringIO()
    print_summary(summary, config, file=out)
    text = out.getvalue()
    assert "13.6x" in text and "512.0x" in text
    assert "0.9 (tensors sent dense)" in text and "per_layer=True" in text
    assert describe_momentum({"algorithm": "liec", "momentum": 0.0}) == "0"
