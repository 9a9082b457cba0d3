"""``hvdcomp bench comm`` on real ranks, the emulated link (comm and train), and the plot.

Byte counts are checked against an independent computation written here from the documented
rules: the chunking of docs/design.md (ceil(d/N) rounded up to 64 elements), the exchange's
accounting (bytes a rank sends to other ranks; allreduces as a ring), and the compressors' wire
formats (sign: 4 + ceil(d/8) bytes; top-k: its payload_nbytes). No timing is asserted beyond
being positive and ordered (min ≤ median ≤ max).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multirank import launch_command, launcher_env, require, run_command

REPO = Path(__file__).resolve().parents[1]
HVDCOMP = [sys.executable, "-m", "hvdcomp.cli.main"]
N = 2


# --- the independent model of the bytes --------------------------------------------------------
def chunks(numel: int, size: int, alignment: int = 64):
    per_rank = -(-numel // size)
    per_rank = -(-per_rank // alignment) * alignment
    return [max(0, min(numel, (j + 1) * per_rank) - min(numel, j * per_rank)) for j in range(size)]


def payload(spec: str, numel: int) -> int:
    """Wire size of one chunk; sign written out from its documented format."""
    if numel == 0:
        return 0
    if spec == "sign":
        return 4 + math.ceil(numel / 8)
    if spec == "none":
        return 4 * numel
    from hvdcomp.compressors import from_spec
    return from_spec(spec).payload_nbytes(numel)


def expected_mean_bytes(pattern: str, up: str, down: str, numel: int, size: int = N):
    """(up, down) bytes per rank of one round, averaged over ranks."""
    pieces = chunks(numel, size)
    ups, downs = [], []
    for rank in range(size):
        if pattern == "two_phase":
            ups.append(sum(payload(up, c) for j, c in enumerate(pieces) if j != rank))
            # plus, for sign, the allgather of the chunks' L1 norms (one float64 per rank) that
            # gives the downlink one scale per bucket
            norms = 8 * (size - 1) if down == "sign" else 0
            downs.append((size - 1) * payload(down, pieces[rank]) + norms)
        elif pattern == "allgather":
            ups.append((size - 1) * payload(up, numel))
            downs.append(0)
        else:  # an allreduce of `numel` elements of 4 bytes (or 2 for fp16), counted as a ring
            item = 2 if up == "fp16" else 4
            ups.append(sum(item * c for j, c in enumerate(pieces) if j != rank))
            downs.append((size - 1) * item * pieces[rank])
    return sum(ups) / size, sum(downs) / size


def run_hvdcomp(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(HVDCOMP + list(args), capture_output=True, text=True, cwd=REPO,
                          env=env or launcher_env(), timeout=timeout)


def parse_json_output(text: str) -> dict:
    start = text.index("{")             # mpirun prints nothing else on stdout, but be lenient
    return json.loads(text[start:text.rindex("}") + 1])


def mpirun_hvdcomp(args, timeout=300) -> dict:
    require("mpi")
    done = run_command(launch_command(N, "mpi", HVDCOMP + list(args)), timeout)
    assert done.returncode == 0, done.stdout
    return parse_json_output(done.stdout)


# --- bench comm on 2 real ranks ----------------------------------------------------------------
COMM_ARGS = ["bench", "comm", "--sizes", "0.25", "--repeats", "2", "--warmup", "1",
             "--algorithms", "liec,memsgd", "--compressors", "sign,topk:ratio=0.01",
             "--patterns", "two_phase,allgather", "--json"]


def check_comm_document(doc: dict, link=None) -> None:
    numel = 65536                                         # 0.25 MiB of fp32
    assert doc["world_size"] == N and doc["link"] == link and doc["repeats"] == 2
    # the Horovod settings in force in the ranks (here: Horovod's defaults or the user's)
    assert set(doc["horovod_settings"]) == {"HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD"}
    from hvdcomp.compressors import from_spec
    topk = from_spec("topk:ratio=0.01").spec()             # the spec as the compressor writes it
    kinds = [(r["kind"], r["algorithm"], r["up"], r["pattern"]) for r in doc["results"]]
    expected_rows = [("horovod", None, None, None), ("horovod-fp16", None, None, None)] + [
        ("exchange", a, c, p) for a in ("liec", "memsgd") for c in ("sign", topk)
        for p in ("two_phase", "allgather")]
    assert kinds == expected_rows
    for row in doc["results"]:
        assert row["numel"] == numel and row["size_mib"] == 0.25
        assert 0 < row["time_min_s"] <= row["time_median_s"] <= row["time_max_s"]
        assert len(row["times_s"]) == 2
        algbw = 4 * numel / row["time_median_s"] / 1e9
        assert row["algbw_gbps"] == pytest.approx(algbw)
        assert row["busbw_gbps"] == pytest.approx(algbw * 2 * (N - 1) / N)
        if row["kind"] == "exchange":
            # memsgd sends the downlink dense whatever the uplink compressor is
            down = "none" if row["algorithm"] == "memsgd" else row["up"]
            assert row["down"] == down
            up_spec = row["up"]
            counted = expected_mean_bytes(row["pattern"], up_spec, down, numel)
            whole_up, whole_down = payload(up_spec, numel), payload(down, numel)
            formula = ((N - 1) / N * whole_up, (N - 1) / N * whole_down) \
                if row["pattern"] == "two_phase" else ((N - 1) * whole_up, 0)
        else:
            fp16 = row["kind"] == "horovod-fp16"
            counted = expected_mean_bytes("allreduce", "fp16" if fp16 else "none", None, numel)
            item = 2 if fp16 else 4
            formula = ((N - 1) / N * item * numel,) * 2
        assert (row["bytes_up"], row["bytes_down"]) == pytest.approx(counted)
        assert (row["formula_up"], row["formula_down"]) == pytest.approx(formula)
        within = all(abs(c - f) <= 0.02 * f if f else c == 0 for c, f in zip(counted, formula))
        assert row["bytes_ok"] is within
        assert row["speedup_vs_horovod"] == pytest.approx(
            doc["results"][0]["time_median_s"] / row["time_median_s"])


@pytest.mark.mpi
def test_bench_comm_two_ranks_json_bytes_match_formulas(tmp_path):
    out = tmp_path / "comm.json"
    old_umask = os.umask(0o022)
    try:
        doc = mpirun_hvdcomp(COMM_ARGS + ["--out", str(out)])
    finally:
        os.umask(old_umask)
    check_comm_document(doc)
    # the ranks' threads are reported; the launcher's OMP_NUM_THREADS (tests: 1) wins over the
    # share of the node's cores that hvdcomp.threads.share_cores gives otherwise
    assert doc["threads_per_rank"] == int(launcher_env()["OMP_NUM_THREADS"])
    assert json.loads(out.read_text()) == doc                  # the file holds what was printed
    assert out.stat().st_mode & 0o777 == 0o644                 # like any file under umask 022
    # at this size every row is within 2 % of its formula (sign adds a 4-byte scale per chunk,
    # top-k rounds k up per chunk)
    assert all(r["bytes_ok"] for r in doc["results"])


# bench train's tests live in tests/test_bench_train.py


# --- --link: errors, and one real shaped run ---------------------------------------------------
@pytest.mark.parametrize("subcommand", ["comm", "train"])
def test_link_without_ip_and_tc_exits_2_naming_them(tmp_path, subcommand):
    env = launcher_env()
    env["PATH"] = str(tmp_path)             # an empty folder: no ip, no tc, no mpirun
    done = run_hvdcomp(["bench", subcommand, "--link", "1gbit"], env=env, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "ip (" in done.stderr and "tc (" in done.stderr
    assert "--link" in done.stderr


def test_link_rate_that_tc_cannot_read_exits_2():
    done = run_hvdcomp(["bench", "comm", "--link", "1gigabit"], timeout=120)
    assert done.returncode == 2
    assert "1gigabit" in done.stderr and "gbit" in done.stderr


def test_bad_pattern_exits_2():
    done = run_hvdcomp(["bench", "comm", "--patterns", "ring"], timeout=120)
    assert done.returncode == 2 and "ring" in done.stderr


def test_rate_parsing_and_tbf_arguments():
    from hvdcomp.netns import parse_rate, tbf_arguments
    assert parse_rate("1gbit") == 10**9 and parse_rate("100MBIT") == 10**8
    assert parse_rate("2.5gbit") == 2_500_000_000 and parse_rate("unshaped") is None
    for bad in ("fast", "-1gbit", "1 gigabit", "0mbit"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    args = tbf_arguments(10**9)
    assert args[:3] == ["tbf", "rate", str(10**9)]
    # the documented bucket: 0.5 ms of traffic, at least 32 KiB
    assert int(args[args.index("burst") + 1]) == max(32 * 1024, 10**9 // 8 // 2000)


def _can_emulate() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "tc", "mpirun", "unshare"))


def _our_namespaces() -> set:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in done.stdout.splitlines() if line.startswith("hvdc-")}


@pytest.mark.mpi
@pytest.mark.skipif(not _can_emulate(), reason="needs root with ip, tc, mpirun and unshare")
def test_shaped_link_run_creates_and_removes_namespaces():
    require("mpi")
    before = _our_namespaces()
    done = run_hvdcomp(COMM_ARGS[:2] + ["--link", "100mbit"] + COMM_ARGS[2:], timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = parse_json_output(done.stdout)
    check_comm_document(doc, link="100mbit")
    assert doc["hosts"] == ["hvdc-node0", "hvdc-node1"]     # one rank per namespace
    for row in doc["results"]:
        # the veth's own counter carries at least the payload this rank sent
        assert row["wire_tx_bytes"] >= row["bytes_up"] + row["bytes_down"]
    assert _our_namespaces() == before


@pytest.mark.mpi
@pytest.mark.skipif(not _can_emulate(), reason="needs root with ip, tc, mpirun and unshare")
def test_interrupted_link_run_still_removes_namespaces():
    require("mpi")
    before = _our_namespaces()
    proc = subprocess.Popen(HVDCOMP + ["bench", "comm", "--link", "100mbit", "--sizes", "4",
                                       "--repeats", "50", "--algorithms", "none", "--json"],
                            cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (_our_namespaces() - before) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert _our_namespaces() - before, "the launcher never created its namespaces"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert _our_namespaces() == before


# --- the plot ----------------------------------------------------------------------------------
def test_plot_series_and_png(tmp_path):
    from hvdcomp.bench.plot import load, plot_step_time_vs_bandwidth, series

    def doc(link, steps):
        return {"link": link, "results": [
            {"method": m, "step_s": s, "model": "cnn", "batch_size": 4, "world_size": 2}
            for m, s in steps.items()]}

    paths = []
    for link, steps in (("1gbit", {"ideal": 0.1, "horovod": 0.5}),
                        (None, {"ideal": 0.1, "horovod": 0.15}),
                        ("100mbit", {"ideal": 0.1, "horovod": 4.0})):
        path = tmp_path / f"{link}.json"
        path.write_text(json.dumps(doc(link, steps)))
        paths.append(str(path))
    data = series(load(paths))
    assert data["horovod"] == [(10**8, 4.0), (10**9, 0.5), (None, 0.15)]
    out = plot_step_time_vs_bandwidth(load(paths), str(tmp_path / "img" / "plot.png"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="bench train"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"results": [{"method": "x"}]}))
        load([str(bad)])


# --- options that cannot be honoured fail before measuring (issue 14) ---------------------------
@pytest.mark.parametrize("out", ["missing-folder/r.json", "a-file/r.json", "a-folder"])
@pytest.mark.parametrize("subcommand", ["comm", "train", "comm --link 1gbit"])
def test_unwritable_out_fails_before_measuring(tmp_path, subcommand, out):
    (tmp_path / "a-file").write_text("a file, not a folder")
    (tmp_path / "a-folder").mkdir()
    target = tmp_path / out
    done = run_hvdcomp(["bench", *subcommand.split(), "--out", str(target)], timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"Error: --out {target}: ") or (
        "--out" in done.stderr and out == "a-folder"), done.stderr   # click: "is a directory"
    assert "measuring" not in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_results_are_printed_when_the_out_file_cannot_be_written(tmp_path, capsys):
    """The disk refuses after measuring (here: the folder became a file): the JSON is shown."""
    from hvdcomp.bench.output import BenchError
    from hvdcomp.cli.bench_comm import emit
    from rich.table import Table
    (tmp_path / "was-a-folder").write_text("")
    payload = {"results": [{"method": "x", "time_median_s": 0.5}]}
    with pytest.raises(BenchError, match="they are printed above"):
        emit(payload, False, str(tmp_path / "was-a-folder" / "r.json"), lambda: Table("method"))
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):]) == payload


@pytest.mark.parametrize("sizes, words", [
    ("1e12", "Error: --sizes: 1e+12 MiB needs about"),
    ("inf", "Error: --sizes: size 'inf' must be a positive, finite number of MiB"),
])
def test_sizes_beyond_memory_are_one_error(sizes, words):
    done = run_hvdcomp(["bench", "compressors", "--sizes", sizes], timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(words), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_memory_check_uses_what_the_machine_has():
    from hvdcomp.bench.output import BenchError, available_memory, check_sizes_fit
    with open("/proc/meminfo") as meminfo:
        free = next(int(line.split()[1]) * 1024 for line in meminfo
                    if line.startswith("MemAvailable:"))
    assert abs(available_memory() - free) < free * 0.2 + 2**28   # it changes while we look
    check_sizes_fit([1.0], copies=8)
    with pytest.raises(BenchError, match="2 buffers of that size"):
        check_sizes_fit([free / 2**20], copies=2)
