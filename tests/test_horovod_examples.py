"""examples/: Horovod-style scripts (a synthetic benchmark, an MNIST-like training) and the same
scripts with the one changed line, run under ``mpirun -np 2`` (kept short by their arguments)."""
import difflib
import re
import sys
from pathlib import Path

import pytest

from multirank import launch_command, require, run_command

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAIRS = {
    "benchmark": ("pytorch_synthetic_benchmark.py", "pytorch_synthetic_benchmark_hvdcomp.py",
                  ["--batch-size", "8", "--num-warmup-batches", "1", "--num-batches-per-iter",
                   "2", "--num-iters", "2"]),
    "mnist": ("pytorch_mnist.py", "pytorch_mnist_hvdcomp.py",
              ["--epochs", "2", "--train-size", "512", "--batch-size", "32", "--lr", "0.05",
               "--log-interval", "100"]),
}


def _changed_code_lines(before: Path, after: Path):
    """Lines of ``after`` that differ from ``before``, outside the module docstring."""
    a, b = before.read_text().splitlines(), after.read_text().splitlines()
    docstring_end = next(i for i, line in enumerate(b) if line.startswith('"""') and i > 0
                         or i > 0 and line.endswith('"""'))
    changed = []
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, a, b).get_opcodes():
        if tag != "equal":
            changed += [line for j, line in enumerate(b[j1:j2], j1) if j > docstring_end]
    return changed


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_only_the_optimizer_line_changes(pair):
    before, after, _ = PAIRS[pair]
    changed = _changed_code_lines(EXAMPLES / before, EXAMPLES / after)
    assert changed[0] == "import hvdcomp", changed
    assert len(changed) == 2 and "hvdcomp.DistributedOptimizer(" in changed[1], changed


def _run(script, args):
    done = run_command(launch_command(2, "mpi", [sys.executable, str(EXAMPLES / script), *args]),
                       timeout=300)
    assert done.returncode == 0, done.stdout
    return done.stdout


@pytest.mark.mpi
def test_benchmark_with_the_one_line_change_runs():
    require("mpi")
    _, after, args = PAIRS["benchmark"]
    out = _run(after, args)
    assert "Iter #1:" in out and "Total img/sec on 2 CPU(s)" in out, out


@pytest.mark.mpi
def test_mnist_before_and_after_both_learn():
    require("mpi")
    before, after, args = PAIRS["mnist"]
    accuracies = []
    for script in (before, after):
        out = _run(script, args)
        accuracies.append(float(re.findall(r"Accuracy: ([0-9.]+)%", out)[-1]))
    # chance is 10 %; in these 16 steps 1-bit LIEC-SGD learns more slowly than plain averaging
    assert accuracies[0] > 40 and accuracies[1] > 20, accuracies
