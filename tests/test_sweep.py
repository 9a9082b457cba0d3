"""Sweep specs: validation errors name file, line and key; expansion; rendered scripts.

Everything here runs without Slurm; tests/test_slurm.py submits to a real cluster."""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hvdcomp import slurm_render
from hvdcomp.cli.main import cli
from hvdcomp.sweep import (FALLBACK_TRAIN_OPTIONS, SpecError, load_spec, point_name,
                           train_arguments, train_options)
from hvdcomp.sweep_problems import find_line

REPO = Path(__file__).resolve().parent.parent
SHIPPED_SPECS = sorted((REPO / "jobs").glob("*.toml"))

MINIMAL = """\
[sweep]
name = "t"

[train]
model = "mlp"
dataset = "digits"
epochs = 1

[matrix]
algorithm = ["psgd", "liec", "memsgd"]
compressor = ["none", "sign"]
ranks = [2, 4]
exclude = [{ algorithm = "psgd", compressor = "sign" }]

[cluster]
time = "00:05:00"
tasks-per-node = 2
"""


def write_spec(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle`` (the test's own oracle)."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_expansion_is_the_product_minus_excludes(tmp_path: Path):
    spec = load_spec(write_spec(tmp_path, MINIMAL))
    expected = [(a, c, r) for a, c, r in itertools.product(["psgd", "liec", "memsgd"],
                                                            ["none", "sign"], [2, 4])
                if not (a == "psgd" and c == "sign")]
    got = [(p.options["algorithm"], p.options["compressor"], p.ranks) for p in spec.points]
    assert got == expected
    for point in spec.points:
        assert point.options["model"] == "mlp" and point.options["epochs"] == 1
        assert "ranks" not in point.options
    names = [p.name for p in spec.points]
    assert len(set(names)) == len(names)
    assert names[0] == "algorithm-psgd_compressor-none_ranks-2"


def test_ranks_layout(tmp_path: Path):
    spec = load_spec(write_spec(tmp_path, MINIMAL))
    # tasks-per-node = 2: 2 ranks on one node, 4 ranks on two nodes
    assert spec.cluster.layout(2) == (1, 2)
    assert spec.cluster.layout(4) == (2, 2)


def test_include_adds_points(tmp_path: Path):
    text = MINIMAL.replace('exclude = [{ algorithm = "psgd", compressor = "sign" }]',
                           'include = [{ algorithm = "liec", compressor = "sign", ranks = 2, '
                           'period = 100 }]')
    spec = load_spec(write_spec(tmp_path, text))
    assert len(spec.points) == 3 * 2 * 2 + 1
    extra = spec.points[-1]
    assert extra.options["period"] == 100 and extra.ranks == 2
    assert "period-100" in extra.name


def test_names_are_deterministic_and_safe():
    axes = ["algorithm", "compressor"]
    name = point_name({"compressor": "topk:ratio=0.01", "algorithm": "dgc"}, axes)
    assert name == point_name({"algorithm": "dgc", "compressor": "topk:ratio=0.01"}, axes)
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", name)
    # values that sanitise alike stay distinct
    assert point_name({"c": "a:b"}, ["c"]) != point_name({"c": "a-b"}, ["c"])


@pytest.mark.parametrize("mutation, needle, message", [
    (('time = "00:05:00"', 'time = "00:05:00"\npartitoin = "gpu"'), "partitoin",
     "did you mean 'partition'"),
    (('tasks-per-node = 2', 'tasks-per-node = "two"'), "tasks-per-node", "positive integer"),
    (('time = "00:05:00"', 'time = "five minutes"'), "time =", "Slurm time"),
    (('epochs = 1', 'epochs = 1\nbatchsize = 3'), "batchsize", "did you mean 'batch-size'"),
    (('epochs = 1', 'epochs = "one"'), "epochs =", "epochs"),
    (('epochs = 1', 'epochs = 1\nout = "x"'), "out =", "run directory"),
    (('ranks = [2, 4]', 'ranks = [0]'), "ranks =", "positive integer"),
    (('[cluster]', '[clusters]'), "[clusters]", "unknown key 'clusters'"),
    (('tasks-per-node = 2', 'tasks-per-node = 2\nlauncher = "mpiexec"'), "launcher", "srun"),
    (('tasks-per-node = 2', 'tasks-per-node = 2\n[cluster.env]\n"NCCL-X" = 1'), "NCCL-X",
     "shell variable"),
    (('exclude = [{ algorithm = "psgd", compressor = "sign" }]',
      'exclude = [{ algoritm = "psgd" }]'),
     "exclude", "algoritm"),
    (('tasks-per-node = 2', 'tasks-per-node = 2\nrequeue-warning = 300'), "requeue-warning",
     "requeue-warning = 300 s is not shorter than time = '00:05:00'"),
    (('time = "00:05:00"', 'time = "1"'), "time =", "not shorter than time = '1'"),
    (('tasks-per-node = 2', 'tasks-per-node = 2\nmax-concurrent = 0'), "max-concurrent",
     "positive integer"),
    (('tasks-per-node = 2', 'tasks-per-node = 2\nmax-requeues = -1'), "max-requeues", ">= 0"),
])
def test_errors_name_file_line_and_key(tmp_path: Path, mutation, needle, message):
    text = MINIMAL.replace(*mutation)
    assert text != MINIMAL
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    error = str(info.value)
    assert error.startswith(f"{path}:{line_of(text, needle)}:"), error
    assert message in error


def test_toml_syntax_error_names_the_line(tmp_path: Path):
    text = MINIMAL.replace("epochs = 1", "epochs = = 1")
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}:{line_of(text, 'epochs = = 1')}: not valid TOML")


def test_every_point_excluded_is_an_error(tmp_path: Path):
    text = MINIMAL.replace('exclude = [{ algorithm = "psgd", compressor = "sign" }]',
                           'exclude = [{ ranks = 2 }, { ranks = 4 }]')
    with pytest.raises(SpecError, match="empty"):
        load_spec(write_spec(tmp_path, text))


def test_find_line_handles_headers_dotted_and_quoted_keys():
    text = '[a]\nx = 1\n[b.env]\n"Y" = 2\n[c]\nb.env.Z = 3\n'
    assert find_line(text, ("a",), "x") == 2
    assert find_line(text, ("b", "env"), "Y") == 4
    assert find_line(text, ("c", "b", "env"), "Z") == 6
    assert find_line(text, ("b", "env"), None) == 3


def test_fallback_list_names_the_options_of_the_brief():
    for name in ("model", "dataset", "data-dir", "algorithm", "compressor", "down-compressor",
                 "epochs", "steps", "batch-size", "lr", "momentum", "weight-decay", "seed",
                 "checkpoint-every", "quiet"):
        assert name in FALLBACK_TRAIN_OPTIONS


def test_train_options_follow_the_real_command_when_it_imports():
    options = train_options()
    try:
        from hvdcomp.cli.train import command
    except ImportError:
        assert options.source.startswith("fallback")
        return
    assert options.source == "hvdcomp.cli.train"
    longs = {o[2:] for p in command.params if not getattr(p, "hidden", False)
             for o in getattr(p, "opts", []) if o.startswith("--")}
    assert set(options.options) == longs
    assert "stop-after-steps" not in options.options   # hidden, for tests only


def test_train_arguments_are_sorted_and_flags_have_no_value(tmp_path: Path):
    text = MINIMAL.replace("epochs = 1", "epochs = 1\nquiet = true\nlr = 0.1")
    spec = load_spec(write_spec(tmp_path, text))
    args = train_arguments(spec.points[0], spec.train_options)
    flags = [a for a in args if a.startswith("--")]
    assert flags == sorted(flags)
    assert "--quiet" in args and args[args.index("--lr") + 1] == "0.1"
    assert "--out" not in args


def render_text(tmp_path: Path, text: str, point: int = 0) -> str:
    spec = load_spec(write_spec(tmp_path, text))
    paths = slurm_render.SweepPaths(tmp_path / "sweep")
    return slurm_render.render(spec, paths, write=False, workdir=tmp_path)[point].text


def test_rendered_script_for_srun(tmp_path: Path):
    text = render_text(tmp_path, MINIMAL)
    assert text.startswith("#!/bin/bash\n")
    assert "#SBATCH --ntasks=2\n" in text and "#SBATCH --time=00:05:00\n" in text
    assert "srun --mpi=pmix --ntasks=2" in text
    run_dir = tmp_path / "sweep" / "runs" / "algorithm-psgd_compressor-none_ranks-2"
    assert f"RUN_DIR={run_dir}" in text
    assert "#SBATCH --requeue" in text and "#SBATCH --overcommit" not in text
    assert "--algorithm psgd" in text and "--compressor none" in text
    bash_n = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert bash_n.returncode == 0, bash_n.stderr


def test_rendered_script_for_mpirun_overcommit_gpus_env(tmp_path: Path):
    text = MINIMAL.replace('tasks-per-node = 2', '''tasks-per-node = 4
cpus-per-node = 2
launcher = "mpirun"
gpus-per-node = 4
modules = ["openmpi/4.1"]

[cluster.env]
NCCL_DEBUG = "WARN"
HOROVOD_FUSION_THRESHOLD = 67108864''')
    script = render_text(tmp_path, text, point=1)  # ranks = 4 on one node of 2 CPUs
    assert "#SBATCH --overcommit" in script
    assert "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1" in script
    assert "mpirun -np 4" in script and "--oversubscribe" in script
    assert "-x NCCL_DEBUG" in script and "export HOROVOD_FUSION_THRESHOLD=67108864" in script
    assert "#SBATCH --gpus-per-node=4" in script and "CUDA_VISIBLE_DEVICES" in script
    assert "module load openmpi/4.1" in script
    bash_n = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert bash_n.returncode == 0, bash_n.stderr


def test_gpu_binding_picks_one_gpu_per_local_rank(tmp_path: Path):
    """Run the rendered binding wrapper: local rank 1 of GPUs "4,5" must see GPU 5 only."""
    text = MINIMAL.replace('tasks-per-node = 2', 'tasks-per-node = 2\ngpus-per-node = 2')
    script = render_text(tmp_path, text)
    start = script.index("BIND=(bash -c")
    bind = script[start:script.index("bind-gpu)", start) + len("bind-gpu)")]
    probe = bind + '\n"${BIND[@]}" bash -c \'echo "$CUDA_VISIBLE_DEVICES"\'\n'
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "SLURM_LOCALID": "1",
                              "CUDA_VISIBLE_DEVICES": "4,5"})
    assert out.stdout.strip() == "5", out.stderr


def test_the_torch_engine_gets_rank_0s_address_on_srun_and_mpirun(tmp_path: Path):
    """`engine` is a train option like any other (a matrix axis here); the torch engine's script
    exports MASTER_ADDR / MASTER_PORT (srun and mpirun give torch.distributed no rendezvous),
    and mpirun forwards them to every rank."""
    text = MINIMAL.replace('ranks = [2, 4]', 'ranks = [2]\nengine = ["horovod", "torch"]')
    horovod, torch_ = render_text(tmp_path, text, 0), render_text(tmp_path, text, 1)
    assert "--engine horovod" in horovod and "MASTER_ADDR" not in horovod
    assert "--engine torch" in torch_ and "srun --mpi=pmix --ntasks=2" in torch_
    start = torch_.index('if [ -z "${MASTER_ADDR:-}" ]')
    exports = torch_[start:torch_.index("export MASTER_PORT", start)]
    exports += torch_[torch_.index("export MASTER_PORT"):].splitlines()[0]
    probe = exports + '\necho "$MASTER_ADDR:$MASTER_PORT"'
    if shutil.which("scontrol"):      # the job's first node, from Slurm's compressed node list
        out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True,
                             env={**os.environ, "SLURM_JOB_ID": "1234",
                                  "SLURM_JOB_NODELIST": "node[3-4]"})
        assert out.stdout.strip() == "node3:30735", out.stderr
    out = subprocess.run(["/bin/bash", "-c", probe], capture_output=True, text=True,
                         env={"PATH": "/nonexistent", "SLURM_JOB_ID": "1234"})
    assert out.stdout.strip() == "127.0.0.1:30735", out.stderr   # no scontrol: one node
    mpirun = render_text(tmp_path, text.replace('tasks-per-node = 2',
                                                'tasks-per-node = 2\nlauncher = "mpirun"'), 1)
    assert "-x MASTER_ADDR -x MASTER_PORT" in mpirun
    for script in (horovod, torch_, mpirun):
        bash_n = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert bash_n.returncode == 0, bash_n.stderr


def test_rendering_is_deterministic(tmp_path: Path):
    assert render_text(tmp_path, MINIMAL) == render_text(tmp_path, MINIMAL)


@pytest.mark.parametrize("spec_path", SHIPPED_SPECS, ids=[p.name for p in SHIPPED_SPECS])
def test_shipped_specs_load_and_render(spec_path: Path, tmp_path: Path):
    spec = load_spec(spec_path)
    assert spec.points
    scripts = slurm_render.render(spec, slurm_render.SweepPaths(tmp_path), write=True, workdir=REPO)
    assert sorted(p.name for p in (tmp_path / "scripts").iterdir()) == sorted(
        f"{p.name}.sbatch" for p in spec.points)
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script.path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.path}: {result.stderr}"


def test_smoke_spec_is_small():
    spec = load_spec(REPO / "jobs" / "smoke-digits.toml")
    assert {p.ranks for p in spec.points} == {2}
    assert {(p.options["algorithm"], p.options["compressor"]) for p in spec.points} == {
        ("psgd", "none"), ("liec", "sign")}
    assert all(p.options["dataset"] == "digits" and p.options["model"] == "mlp"
               and p.options["epochs"] == 1 for p in spec.points)


def test_cli_render_and_bad_spec(tmp_path: Path):
    runner = CliRunner()
    spec = write_spec(tmp_path, MINIMAL)
    result = runner.invoke(cli, ["slurm", "render", str(spec), "--out", str(tmp_path / "o"),
                                 "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("#!/bin/bash") == 10
    assert not (tmp_path / "o").exists()
    result = runner.invoke(cli, ["slurm", "render", str(spec), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "o" / "scripts").glob("*.sbatch"))) == 10

    bad = write_spec(tmp_path, MINIMAL.replace("epochs = 1", "epoch = 1"), "bad.toml")
    result = runner.invoke(cli, ["slurm", "render", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:{line_of(MINIMAL, 'epochs = 1')}:" in result.output
    assert "'epoch'" in result.output


def test_submit_without_sbatch_leaves_no_record(tmp_path: Path, monkeypatch):
    """No sbatch on PATH: one clear message, no job record (a real missing binary, not a mock)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    spec = write_spec(tmp_path, MINIMAL)
    result = CliRunner().invoke(cli, ["slurm", "submit", str(spec), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2                      # run it where Slurm is: bad usage
    assert "sbatch not found on PATH" in result.output
    assert list((tmp_path / "o" / "jobs").iterdir()) == []


# --- values checked the way hvdcomp train checks them, before anything is written (issue 14) ----
BAD_VALUES = MINIMAL.replace('model = "mlp"', 'model = "resnet99"').replace(
    "epochs = 1", "epochs = 1\nlr = -0.1").replace(
    'algorithm = ["psgd", "liec", "memsgd"]', 'algorithm = ["psgd", "liec", "lice"]').replace(
    'compressor = ["none", "sign"]', 'compressor = ["none", "sign", "qsgd:levels=0"]').replace(
    'exclude = [{ algorithm = "psgd", compressor = "sign" }]',
    'include = [{ algorithm = "liec", compressor = "topk:ratio=2", ranks = 2 }]')


def test_every_bad_value_is_reported_at_its_line(tmp_path: Path):
    path = write_spec(tmp_path, BAD_VALUES)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    problems = info.value.problems
    expected = [  # (needle of the line, key, words of train's own message)
        ('model = "resnet99"', "train.model", "unknown model 'resnet99'"),
        ("lr = -0.1", "train.lr", "--lr must be positive, got -0.1"),
        ("algorithm = [", "matrix.algorithm", "unknown algorithm 'lice'"),
        ("compressor = [", "matrix.compressor",
         "qsgd: levels must be an integer in [1, 127], got 0"),
        ("include = [", "matrix.include", "compressor: --up/--compressor 'topk:ratio=2': "
                                           "topk: ratio must be a number in (0, 1], got 2"),
    ]
    assert len(problems) == len(expected), problems
    for problem, (needle, key, words) in zip(problems, expected):
        assert problem.startswith(f"{path}:{line_of(BAD_VALUES, needle)}: {key}: "), problem
        assert words in problem, problem
    assert str(info.value).endswith(f"(5 problems in {path}; nothing was written or submitted)")


def test_cli_render_and_submit_refuse_bad_values_before_writing(tmp_path: Path, monkeypatch):
    path = write_spec(tmp_path, BAD_VALUES)
    out = tmp_path / "o"
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no sbatch: it must not be reached
    for command in ("render", "submit"):
        result = CliRunner().invoke(cli, ["slurm", command, str(path), "--out", str(out)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith(f"Error: {path}:{line_of(BAD_VALUES, 'model =')}: train.model: ")
        assert len(lines) == 6 and "Traceback" not in result.output
        assert "sbatch" not in result.output
        assert not out.exists()


def test_a_refused_combination_is_reported_once_at_a_key_that_causes_it(tmp_path: Path):
    """Once for all the points it spoils, at the first key whose removal cures it, preferring
    one the message names (here --compressor)."""
    text = (MINIMAL
            .replace('algorithm = ["psgd", "liec", "memsgd"]', 'algorithm = ["liec", "monna"]')
            .replace('compressor = ["none", "sign"]', 'compressor = ["sign"]')
            .replace('exclude = [{ algorithm = "psgd", compressor = "sign" }]', ''))
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems == [
        f"{path}:{line_of(text, 'compressor =')}: matrix.compressor: 2 points "
        "algorithm-monna_compressor-sign_ranks-2, algorithm-monna_compressor-sign_ranks-4: "
        "algorithm 'monna' exchanges whole models, uncompressed: drop --compressor/--up/--down"]


CIFAR_SPEC = """\
[sweep]
name = "c"

[train]
model = "resnet20"
dataset = "cifar10"
data-dir = "cifar-data"
epochs = 1
device = "cuda"

[cluster]
{cluster}
"""
CIFAR_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch"]


def test_data_dirs_are_checked_only_when_the_spec_says_they_are_local(tmp_path: Path):
    # not local: the folder lives on the cluster; CUDA is the job's business too
    spec = load_spec(write_spec(tmp_path, CIFAR_SPEC.format(cluster="")), workdir=tmp_path)
    assert spec.points[0].options["data-dir"] == "cifar-data"
    # local: train's own check runs here, relative to the job's directory
    text = CIFAR_SPEC.format(cluster="data-local = true")
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path, workdir=tmp_path)
    assert info.value.problems == [
        f"{path}:{line_of(text, 'data-dir')}: train.data-dir: point default: --data-dir "
        f"{tmp_path / 'cifar-data'} is not a directory; it must hold cifar-10-batches-py/"
        "{" + ",".join(CIFAR_FILES) + "} (nothing is downloaded)"]
    folder = tmp_path / "cifar-data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in CIFAR_FILES:
        (folder / name).write_bytes(b"")
    load_spec(path, workdir=tmp_path)
    # no data-dir at all is wrong wherever the data is
    text = CIFAR_SPEC.format(cluster="").replace('data-dir = "cifar-data"\n', "")
    with pytest.raises(SpecError, match="dataset 'cifar10' needs --data-dir"):
        load_spec(write_spec(tmp_path, text, "no-dir.toml"), workdir=tmp_path)


@pytest.mark.parametrize("options, ranks", [
    ({"algorithm": "lice"}, 1), ({"lr": -0.1}, 1), ({"compressor": "qsgd:levels=0"}, 1),
    ({"compressor": "qsgd:levels=1"}, 1), ({"model": "resnet99"}, 1),
    ({"dataset": "synthetic:colour=3"}, 1), ({"algorithm": "monna", "compressor": "sign"}, 1),
    ({"model": "resnet20", "dataset": "synthetic"}, 1), ({"epochs": 0}, 1),
    ({"algorithm": "liec", "algorithm-option": ["beta=0.9"]}, 1), ({"batch-size": "many"}, 1),
])
def test_render_says_what_hvdcomp_train_says(tmp_path: Path, options, ranks):
    """The same options given to the real `hvdcomp train` (one process: it stops before
    training) and to the sweep: the same message, exit code 2 both."""
    from hvdcomp.sweep_check import TrainValidator, option_arguments
    validator = TrainValidator()
    if not validator.available:
        pytest.importorskip("torch")         # without torch train cannot check: fine, said so
        pytest.fail(f"train imports but its checks cannot be reused: {validator.reason}")
    args = option_arguments(train_options(), {"epochs": 1, **options})
    train = subprocess.run([sys.executable, "-m", "hvdcomp.cli.main", "train", *args, "--quiet",
                            "--out", str(tmp_path / "run")],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert train.returncode == 2, train.stdout + train.stderr
    said = train.stderr.strip().splitlines()[-1]
    assert said.startswith("Error: ")
    assert validator.check_arguments(args, ranks) == said[len("Error: "):]


def test_a_binary_spec_is_one_clear_error(tmp_path: Path):
    path = tmp_path / "spec.toml"
    path.write_bytes(b'[sweep]\nname = "x"\n\x89PNG\r\n\x1a\n\x00\xff')
    result = CliRunner().invoke(cli, ["slurm", "render", str(path)])
    assert result.exit_code == 2
    assert result.stderr == (f"Error: {path}:3: not a sweep spec: byte 19 (0x89) is not UTF-8 "
                             "text; a spec is a TOML text file\n")


def test_structural_problems_are_all_reported_too(tmp_path: Path):
    text = MINIMAL.replace('time = "00:05:00"', 'time = "soon"\npartitoin = "gpu"').replace(
        "epochs = 1", "epochs = 1\nbatchsize = 3")
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [p.split(": ")[0] for p in info.value.problems] == [
        f"{path}:{line_of(text, 'batchsize')}", f"{path}:{line_of(text, 'time =')}",
        f"{path}:{line_of(text, 'partitoin')}"]


def test_without_train_the_values_are_not_checked_and_render_says_so(tmp_path: Path):
    """A login node without torch: a real import failure (torch made unimportable)."""
    spec = write_spec(tmp_path, MINIMAL.replace("epochs = 1", "epochs = 1\nlr = -0.1"))
    code = ("import sys; sys.modules['torch'] = None; from hvdcomp.cli.main import main; "
            f"sys.argv = ['hvdcomp', 'slurm', 'render', {str(spec)!r}, '--dry-run']; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "values NOT checked: hvdcomp train does not import here" in done.stderr


def test_render_to_a_folder_it_cannot_write_is_one_error(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    spec = write_spec(tmp_path, MINIMAL)
    result = CliRunner().invoke(cli, ["slurm", "render", str(spec), "--out", str(blocker / "o")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: cannot write the sweep directory {blocker / 'o'}: ")
    assert "Traceback" not in result.output


def test_points_with_equal_resources_form_one_job_array(tmp_path: Path):
    """Submit groups points by their #SBATCH resource lines: MINIMAL's 2-rank and 4-rank points
    make two arrays; task i of an array runs the script of point i; %K caps each."""
    spec = load_spec(write_spec(tmp_path, MINIMAL.replace('time = "00:05:00"',
                                                          'time = "00:05:00"\nmax-concurrent = 2')))
    paths = slurm_render.SweepPaths(tmp_path / "sweep")
    scripts = slurm_render.render(spec, paths, write=True)
    groups = slurm_render.array_groups(scripts)
    assert [sorted(s.point.ranks for s in g) for g in groups] == [[2] * 5, [4] * 5]
    for group in groups:
        text = slurm_render.render_array(spec, paths, group, spec.cluster.max_concurrent)
        assert "#SBATCH --array=0-4%2\n" in text
        assert f"#SBATCH --ntasks={group[0].point.ranks}\n" in text
        assert f"#SBATCH --output={paths.logs / '%A_%a.out'}\n" in text
        bash_n = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
        assert bash_n.returncode == 0, bash_n.stderr
        # what task 3 runs, asked of bash itself
        names = subprocess.run(["bash", "-c", text.split("exec bash")[0] + 'echo "${POINTS[3]}"'],
                               capture_output=True, text=True)
        assert names.stdout.strip() == group[3].point.name


def test_structure_and_value_problems_come_together_in_file_order(tmp_path: Path):
    text = MINIMAL.replace('time = "00:05:00"', 'time = "soon"').replace(
        "epochs = 1", "epochs = 1\nlr = -1.0")
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [p.split(": ")[0] for p in info.value.problems] == [
        f"{path}:{line_of(text, 'lr = -1.0')}", f"{path}:{line_of(text, 'time =')}"]
    assert "--lr must be positive" in info.value.problems[0]
