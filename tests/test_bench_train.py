"""``hvdcomp bench train``: the launcher on 2 real ranks per row (compute-only in plain processes,
Horovod rows, hvdcomp rows, PyTorch DDP peers), its JSON and table, and its refusals.

Byte counts are checked against independent computations written here: the chunk model of
tests/test_bench.py for hvdcomp's exchange, and for DDP the ring allreduce of what each hook
sends (averaged over ranks a ring allreduce of b bytes costs each rank (N-1)/N * b up and as much
down, however it is chunked), with PowerSGD's P and Q sizes from Vogels et al. (a tensor viewed
as n x m sends n*r + m*r values when (n + m) * r * min_compression_rate < n * m, else n * m
uncompressed). No timing is asserted beyond being positive.
"""
from __future__ import annotations

import json
import math
import os

import pytest
from rich.console import Console

from multirank import launcher_env, require
from test_bench import expected_mean_bytes, parse_json_output, run_hvdcomp

N = 2
TINY = ["bench", "train", "--model", "cnn", "--image-size", "8", "--batch-size", "4",
        "--warmup", "1", "--steps", "2"]


def _model_sizes():
    from hvdcomp.train.models import build_model
    return [tuple(p.shape) for p in build_model("cnn", (3, 8, 8), 10).parameters()]


def powersgd_values(shapes, rank: int, min_rate: int = 2) -> int:
    """Values one PowerSGD step allreduces: P (n x r) and Q (m x r) of each compressible matrix,
    every other tensor whole."""
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        n, m = (shape[0], numel // shape[0]) if len(shape) > 1 else (None, None)
        if n is not None and (n + m) * rank * min_rate < n * m:
            total += (n + m) * rank
        else:
            total += numel
    return total


@pytest.fixture(scope="module")
def train_doc():
    """One launcher run: every row kind, --peer ddp, a user's HOROVOD_CYCLE_TIME."""
    require("mpi")
    env = launcher_env()
    env["HOROVOD_CYCLE_TIME"] = "2"
    done = run_hvdcomp(TINY + ["--algorithms", "doublesqueeze,liec", "--compressors", "sign",
                               "--baselines", "horovod", "--peer", "ddp,hvdcomp-ddp",
                               "--powersgd-rank", "2",
                               "--json"], env=env, timeout=2300)
    assert done.returncode == 0, done.stdout + done.stderr
    return parse_json_output(done.stdout)


@pytest.mark.mpi
@pytest.mark.timeout(2400)   # the first of these runs 10 rows of 2 ranks (minutes on 2 cores)
def test_rows_and_ratios(train_doc):
    rows = {r["method"]: r for r in train_doc["results"]}
    assert list(rows) == ["compute-only", "horovod-idle", "horovod", "doublesqueeze[sign]",
                          "liec[sign]", "ddp", "ddp-fp16", "ddp-powersgd[rank=2]",
                          "ddp+doublesqueeze[sign]", "ddp+liec[sign]"]
    numel = sum(math.prod(s) for s in _model_sizes())
    base = rows["compute-only"]["step_s"]
    for name, row in rows.items():
        assert row["parameters"] == numel and row["world_size"] == N
        assert row["steps"] == 2 and row["batch_size"] == 4 and row["step_s"] > 0
        assert row["step_over_compute_only"] == pytest.approx(row["step_s"] / base)
        assert row["samples_per_s"] == pytest.approx(N * 4 / row["step_s"])
        if row["kind"] == "ddp":     # DDP communicates inside backward(): no split
            assert row["compute_s"] is row["compress_s"] is row["comm_s"] is None
        elif row["kind"] == "hvdcomp-ddp":   # hvdcomp's hook times its compression
            assert row["compute_s"] is row["comm_s"] is None and row["compress_s"] > 0
        else:
            assert row["compute_s"] + row["compress_s"] + row["comm_s"] == \
                pytest.approx(row["step_s"])
    assert rows["compute-only"]["step_over_compute_only"] == 1
    liec = rows["liec[sign]"]
    assert liec["period"] == 32 and liec["exact_step_s"] > 0
    assert rows["ddp+liec[sign]"]["period"] == 32 and rows["ddp+liec[sign]"]["exact_step_s"] > 0


@pytest.mark.mpi
@pytest.mark.timeout(2400)   # the first of these runs 10 rows of 2 ranks (minutes on 2 cores)
def test_compute_only_runs_without_any_communication_library(train_doc):
    rows = {r["method"]: r for r in train_doc["results"]}
    assert rows["compute-only"]["comm_modules"] == []
    assert "horovod" in rows["horovod-idle"]["comm_modules"]
    assert "torch.distributed[gloo]" in rows["ddp"]["comm_modules"]
    assert "torch.distributed[gloo]" in rows["ddp+liec[sign]"]["comm_modules"]
    assert all("horovod" not in m for m in rows["ddp"]["comm_modules"])
    assert rows["compute-only"]["bytes_up"] == rows["horovod-idle"]["bytes_down"] == 0


@pytest.mark.mpi
@pytest.mark.timeout(2400)   # the first of these runs 10 rows of 2 ranks (minutes on 2 cores)
def test_bytes_match_independent_models(train_doc):
    rows = {r["method"]: r for r in train_doc["results"]}
    shapes = _model_sizes()
    sizes = [math.prod(s) for s in shapes]
    numel = sum(sizes)
    share = (N - 1) / N
    # hvdcomp: tensors of >= 4096 bytes compressed (one bucket), the others allreduced densely
    large = sum(n for n in sizes if 4 * n >= 4096)
    small = sum(n for n in sizes if 4 * n < 4096)
    sign = expected_mean_bytes("two_phase", "sign", "sign", large)
    dense = expected_mean_bytes("allreduce", "none", None, small)
    for name in ("doublesqueeze[sign]", "liec[sign]", "ddp+doublesqueeze[sign]",
                 "ddp+liec[sign]"):     # hvdcomp's DDP hook runs the same exchange
        assert (rows[name]["bytes_up"], rows[name]["bytes_down"]) == \
            pytest.approx((sign[0] + dense[0], sign[1] + dense[1])), name
    expected = {"horovod": 4 * numel, "ddp": 4 * numel, "ddp-fp16": 2 * numel,
                "ddp-powersgd[rank=2]": 4 * powersgd_values(shapes, rank=2)}
    for name, nbytes in expected.items():
        assert (rows[name]["bytes_up"], rows[name]["bytes_down"]) == \
            pytest.approx((share * nbytes, share * nbytes)), name
    assert rows["ddp-fp16"]["bytes_source"] == "hook calls"


@pytest.mark.mpi
@pytest.mark.timeout(2400)   # the first of these runs 10 rows of 2 ranks (minutes on 2 cores)
def test_horovod_settings_and_memory_fields(train_doc):
    settings = train_doc["horovod_settings"]
    # the user's value wins and says so; the one not set is Horovod's default
    assert settings["HOROVOD_CYCLE_TIME"] == {"value": "2", "source": "environment"}
    assert settings["HOROVOD_FUSION_THRESHOLD"]["source"] in ("Horovod default",
                                                               "hvdcomp bench default")
    for row in train_doc["results"]:
        assert len(row["peak_rss_bytes"]) == N and min(row["peak_rss_bytes"]) > 2**20
        assert row["peak_device_bytes"] is None                 # CPU run
        assert row["horovod_env"]["HOROVOD_CYCLE_TIME"] == "2"   # what every rank saw
    rows = {r["method"]: r for r in train_doc["results"]}
    large = 4 * sum(math.prod(s) for s in _model_sizes() if 4 * math.prod(s) >= 4096)
    assert rows["liec[sign]"]["bucket_bytes"] == rows["ddp+liec[sign]"]["bucket_bytes"] == large
    assert train_doc["threads"] == rows["compute-only"]["threads"] == rows["ddp"]["threads"]


@pytest.mark.mpi
@pytest.mark.timeout(2400)   # the first of these runs 10 rows of 2 ranks (minutes on 2 cores)
def test_table_has_the_new_rows_and_columns(train_doc):
    from hvdcomp.bench.train import markdown
    from hvdcomp.cli.bench_train import train_table

    console = Console(width=400, record=True)
    console.print(train_table(train_doc))
    text = console.export_text()
    for word in ("compute-only", "horovod-idle", "ddp-powersgd[rank=2]", "step ÷ compute-only",
                 "peak MiB/rank", "peak − horovod", "HOROVOD_CYCLE_TIME=2 (environment)"):
        assert word in text, word
    table = markdown(train_doc)
    assert table.count("\n| ") == len(train_doc["results"]) + 1      # header + rows
    assert "× bucket)" in table                                    # hvdcomp rows vs Horovod


# --- refusals: one message, exit 2, nothing measured --------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--peer", "nonsense"], "Error: unknown peer 'nonsense'; choose from ddp"),
    (["--powersgd-rank", "0"], "'--powersgd-rank'"),
    (["--baselines", "nccl"], "Error: unknown baseline 'nccl'"),
    (["--link", "1gbit", "--np", "3"], "Error: --np 3"),
    (["--pattern", "allreduce"], "Error: pattern 'allreduce' needs a linear compressor"),
    (["--algorithms", "powersgd_ef", "--pattern", "two_phase"],
     "Error: powersgd_ef all-reduces its own messages"),
])
def test_bad_input_exits_2(args, words):
    done = run_hvdcomp(["bench", "train", *args], timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "measuring" not in done.stderr
    assert done.stdout == ""


def test_inside_a_launcher_is_refused():
    env = launcher_env()
    env.update(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0")
    done = run_hvdcomp(["bench", "train"], env=env, timeout=120)
    assert done.returncode == 2
    assert "starts its own ranks" in done.stderr and "mpirun" in done.stderr


# --- pure parts ----------------------------------------------------------------------------------
def _record(rank, steps, exact=(), period=None, rss=100):
    return {"rank": rank, "world_size": 2, "parameters": 10, "compressed": steps,
            "exact": list(exact), "period": period, "bytes_source": "optimizer counters",
            "peak_rss_bytes": rss, "peak_device_bytes": None, "threads": 1}


def test_combine_takes_the_slowest_rank_per_step_and_amortises_the_exact_round():
    from hvdcomp.bench.train import TrainMethod, add_ratios, combine

    a = _record(0, [[1.0, 0.5, 0.2, 0.3, 10, 20], [3.0, 2, 0.5, 0.5, 10, 20]],
                exact=[[9.0, 1, 0, 8, 0, 0]], period=4, rss=300)
    b = _record(1, [[2.0, 1, 0.5, 0.5, 30, 40], [1.0, 0.5, 0.25, 0.25, 30, 40]],
                exact=[[5.0, 1, 0, 4, 0, 0]], period=4, rss=200)
    row = combine(TrainMethod("hvdcomp", "liec", "sign"), [b, a], "cnn", 4)
    # steps: rank 1's 2.0 then rank 0's 3.0 -> mean 2.5, compute (1+2)/2, compress, comm
    compressed = 2.5
    amortised = (3 * compressed + 9.0) / 4
    assert row.step_s == pytest.approx(amortised) and row.exact_step_s == 9.0
    assert row.compute_s == pytest.approx(1.5) and row.compress_s == pytest.approx(0.5)
    assert row.comm_s == pytest.approx(0.5 + amortised - compressed)
    assert (row.bytes_up, row.bytes_down) == (20, 30)
    assert row.peak_rss_bytes == [300, 200]             # in rank order
    base = combine(TrainMethod("compute-only"), [_record(0, [[0.5] * 4 + [0, 0]]),
                                                 _record(1, [[1.0] * 4 + [0, 0]])], "cnn", 4)
    add_ratios([base, row])
    assert base.step_over_compute_only == 1 and row.step_over_compute_only == amortised / 1.0
    json.dumps(row.as_dict())


def test_settings_in_force_user_value_wins():
    from hvdcomp import horovod_settings as hs

    env, added = hs.with_bench_defaults({"HOROVOD_CYCLE_TIME": "7"})
    assert env["HOROVOD_CYCLE_TIME"] == "7" and "HOROVOD_CYCLE_TIME" not in added
    shown = hs.settings_in_force(env, added)
    assert shown["HOROVOD_CYCLE_TIME"] == {"value": "7", "source": "environment"}
    for name, value in hs.BENCH_DEFAULTS.items():
        if name != "HOROVOD_CYCLE_TIME":
            assert shown[name] == {"value": value, "source": "hvdcomp bench default"}
    assert hs.settings_in_force({})["HOROVOD_FUSION_THRESHOLD"] == {
        "value": str(128 * 2**20), "source": "Horovod default"}


def test_a_method_without_compressors_gets_one_row_whatever_the_compressors():
    """powersgd_ef (its own factors) is planned once, not crossed with --compressors (which it
    would refuse); the others are crossed."""
    from hvdcomp.bench.train import plan_train_methods
    rows = plan_train_methods(["liec", "powersgd_ef"], ["sign", "topk:ratio=0.01"],
                              baselines=())
    hvdcomp_rows = [(m.algorithm, m.up) for m in rows if m.kind == "hvdcomp"]
    assert hvdcomp_rows == [("liec", "sign"), ("liec", "topk:fp16_values=False,ratio=0.01"),
                            ("powersgd_ef", "none")]


@pytest.mark.mpi
def test_a_crashed_row_is_reported_and_the_other_rows_are_kept():
    """One row's rank 1 exits (a crashed rank, HVDCOMP_BENCH_CRASH_KINDS): the rows before and
    after it are measured and printed, the failure is named on stderr and in ``failed_rows``,
    and the exit status is 1."""
    require("mpi")
    from hvdcomp.bench.train_worker import CRASH_VARIABLE
    env = launcher_env()
    env[CRASH_VARIABLE] = "horovod"
    done = run_hvdcomp(["bench", "train", "--model", "logreg", "--image-size", "4", "--warmup",
                        "0", "--steps", "1", "--algorithms", "doublesqueeze", "--compressors",
                        "sign", "--baselines", "horovod", "--json"], env=env, timeout=900)
    assert done.returncode == 1, done.stdout + done.stderr
    doc = parse_json_output(done.stdout)
    assert [r["method"] for r in doc["results"]] == ["compute-only", "horovod-idle",
                                                     "doublesqueeze[sign]"]
    assert [f["method"] for f in doc["failed_rows"]] == ["horovod"]
    assert "Error: row horovod failed" in done.stderr
    assert "crashes on purpose" in doc["failed_rows"][0]["error"]      # the ranks' own output


def test_train_defaults_apply_on_cpu_only_and_never_over_a_users_value(monkeypatch):
    from hvdcomp import horovod_settings as hs
    # set, then removed, through monkeypatch: it restores the original environment at the end,
    # whatever apply_train_defaults wrote into os.environ meanwhile
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "unset-me")
    monkeypatch.delenv("HOROVOD_CYCLE_TIME")
    assert hs.apply_train_defaults("cuda") == {}
    assert "HOROVOD_CYCLE_TIME" not in os.environ
    assert hs.apply_train_defaults("cpu") == {"HOROVOD_CYCLE_TIME": "5"}
    shown = hs.settings_in_force(applied={"HOROVOD_CYCLE_TIME": "5"}, applied_by="train")
    assert shown["HOROVOD_CYCLE_TIME"] == {"value": "5", "source": "train"}
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "2")
    assert hs.apply_train_defaults("cpu") == {}
    assert hs.settings_in_force()["HOROVOD_CYCLE_TIME"] == {"value": "2",
                                                           "source": "environment"}
