"""The Python half of scripts/gpu-check.sh: stdlib and torch only, so it runs on a bare GPU machine.

    python scripts/gpu_check.py env OUT            versions and which Python packages are missing
    python scripts/gpu_check.py tests OUT FILE...  the GPU tests without pytest (a minimal runner)
    python scripts/gpu_check.py bench OUT ARGS...  `hvdcomp bench compressors ARGS` (the CLI when
                                                   click and rich import, else the library), JSON
    python scripts/gpu_check.py summary OUT        OUT/summary.md from what the steps wrote

Each subcommand writes its result under OUT and exits 0 unless it failed; the shell script goes
on to the next step either way.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import platform
import re
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: what hvdcomp's CLI and tests import besides torch (pytest: else the minimal runner below)
PACKAGES = ["numpy", "click", "rich", "jinja2", "pytest", "triton", "hypothesis", "horovod"]


def _version(name: str) -> str:
    if importlib.util.find_spec(name) is None:
        return "MISSING"
    try:
        module = importlib.import_module(name)
    except Exception as exc:   # present but broken: say how
        return f"BROKEN ({type(exc).__name__}: {str(exc)[:120]})"
    try:
        return importlib.metadata.version(name)
    except Exception:
        return str(getattr(module, "__version__", "present"))


def env(out: Path) -> int:
    import torch
    facts = {"python": sys.version.split()[0], "platform": platform.platform(),
             "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(),
             "packages": {name: _version(name) for name in PACKAGES}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2 ** 30, 1),
                     device_count=torch.cuda.device_count(),
                     cudnn=torch.backends.cudnn.version(),
                     nccl=".".join(map(str, torch.cuda.nccl.version()))
                     if hasattr(torch.cuda, "nccl") else None)
    (out / "env.json").write_text(json.dumps(facts, indent=2) + "\n")
    for key, value in facts.items():
        if key != "packages":
            print(f"{key:>15}: {value}")
    for name, version in facts["packages"].items():
        print(f"{name:>15}: {version}")
    missing = [name for name, version in facts["packages"].items()
               if not version[0].isdigit() and version != "present" and name != "horovod"]
    if missing:
        print(f"gpu-check: missing or broken: {', '.join(missing)} (hypothesis is not needed by "
              "the GPU tests; without pytest they run under scripts/gpu_check.py's runner; "
              "without click or rich the benchmark runs through the library)")
    return 0


# --- a minimal pytest, for a machine that has none ------------------------------------------------
class Skipped(Exception):
    pass


#: marks that take arguments before they decorate
ARGUMENT_MARKS = ("parametrize", "skipif", "skip", "timeout", "filterwarnings")


class _Mark:
    """``pytest.mark.NAME``: a decorator, or called with arguments, a new mark carrying them."""

    def __init__(self, name, args=(), kwargs=None):
        self.name, self.args, self.kwargs = name, args, kwargs or {}

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs and (self.args or self.name
                                                                     not in ARGUMENT_MARKS):
            args[0].__dict__.setdefault("_gpu_check_marks", []).append(self)
            return args[0]
        return _Mark(self.name, args, kwargs)


class _MarkFactory:
    def __getattr__(self, name):
        return _Mark(name)


class _Raises:
    def __init__(self, expected, match=None):
        self.expected, self.match = expected, match

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            raise AssertionError(f"DID NOT RAISE {self.expected}")
        if not issubclass(kind, self.expected):
            return False
        if self.match is not None and not re.search(self.match, str(value)):
            raise AssertionError(f"{kind.__name__} {value!r} does not match {self.match!r}")
        return True


def _importorskip(name, minversion=None, reason=None):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise Skipped(reason or f"could not import {name!r}") from None


def _skip(reason=""):
    raise Skipped(reason)


def _fail(reason="", pytrace=True):
    raise AssertionError(reason)


def _fixture(*args, **kwargs):
    raise RuntimeError("gpu_check's runner has no fixtures: install pytest")


def fake_pytest() -> types.ModuleType:
    module = types.ModuleType("pytest")
    module.mark = _MarkFactory()
    module.raises, module.skip, module.importorskip = _Raises, _skip, _importorskip
    module.fixture, module.fail = _fixture, _fail
    module.approx = None
    return module


def _cases(func):
    """(id, kwargs) for every combination of the function's parametrize marks."""
    axes = []
    for mark in getattr(func, "_gpu_check_marks", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], list(mark.args[1])
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        ids = mark.kwargs.get("ids") or [str(v) for v in values]
        rows = [dict(zip(names, v if len(names) > 1 else (v,))) for v in values]
        axes.append(list(zip(ids, rows)))
    for combo in itertools.product(*reversed(axes)) if axes else [()]:
        kwargs = {}
        for _, row in combo:
            kwargs.update(row)
        yield "-".join(case_id for case_id, _ in combo), kwargs


def _skip_reason(marks) -> "str | None":
    for mark in marks:
        if mark.name == "skipif" and mark.args and mark.args[0]:
            return mark.kwargs.get("reason", "skipif")
        if mark.name == "skip":
            return mark.kwargs.get("reason", "skip")
    return None


def _run_case(func, kwargs, module_marks):
    reason = _skip_reason(module_marks + getattr(func, "_gpu_check_marks", []))
    if reason:
        return "skipped", reason
    try:
        func(**kwargs)
        return "passed", ""
    except Skipped as exc:
        return "skipped", str(exc)
    except BaseException:
        return "failed", traceback.format_exc(limit=12)


def tests(out: Path, files) -> int:
    sys.modules["pytest"] = fake_pytest()
    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    records = []
    for path in files:
        name = Path(path).stem
        sys.path.insert(0, str(Path(path).resolve().parent))
        try:
            module = importlib.import_module(name)
        except BaseException:
            records.append({"test": f"{path}::<import>", "outcome": "failed",
                            "detail": traceback.format_exc(limit=12), "seconds": 0.0})
            print(f"FAILED {path}::<import>\n{records[-1]['detail']}", flush=True)
            continue
        marks = getattr(module, "pytestmark", [])
        marks = marks if isinstance(marks, list) else [marks]
        for attr, func in vars(module).items():
            if not (attr.startswith("test_") and callable(func)):
                continue
            if not any(mark.name == "gpu"
                       for mark in marks + getattr(func, "_gpu_check_marks", [])):
                continue                                  # pytest -m gpu would deselect it
            for case_id, kwargs in _cases(func):
                test_id = f"{path}::{attr}" + (f"[{case_id}]" if case_id else "")
                started = time.perf_counter()
                outcome, detail = _run_case(func, kwargs, marks)
                records.append({"test": test_id, "outcome": outcome, "detail": detail,
                                "seconds": round(time.perf_counter() - started, 3)})
                print(f"{test_id} {outcome.upper()}" + (f"\n{detail}" if outcome == "failed"
                                                          else ""), flush=True)
    (out / "gpu-tests.json").write_text(json.dumps(records, indent=1) + "\n")
    counts = {k: sum(r["outcome"] == k for r in records) for k in ("passed", "failed", "skipped")}
    print(f"gpu tests (minimal runner): {counts}")
    return 1 if counts["failed"] else 0


# --- the benchmark --------------------------------------------------------------------------------
def bench(out: Path, args) -> int:
    """``hvdcomp bench compressors ARGS --format json``, one compressor at a time (``sign``, the
    issue's target, first), merged into OUT/bench-compressors-cuda.json after each: a step cut
    short by its time limit (a slow first compile) keeps what it measured. The CLI when click
    and rich import, else the same measurement through the library."""
    sys.path.insert(0, str(REPO))
    target = out / "bench-compressors-cuda.json"
    from hvdcomp.bench import compressors as library
    given = _option(args, "--compressors", None)
    specs = library.parse_spec_list(given) if given else list(library.DEFAULT_COMPRESSORS)
    specs.sort(key=lambda spec: spec != "sign")
    rest = _without_option(args, "--compressors")
    try:
        import click  # noqa: F401
        import rich  # noqa: F401
        measure = _bench_cli
    except ImportError as exc:
        print(f"gpu-check: {exc}; running the benchmark through hvdcomp.bench.compressors")
        measure = _bench_library
    merged, failed = None, []
    for spec in specs:
        started = time.perf_counter()
        record = measure(["--compressors", spec, *rest])
        seconds = time.perf_counter() - started
        print(f"  {spec}: {'done' if record else 'FAILED'} in {seconds:.1f} s", flush=True)
        if record is None:
            failed.append(spec)
            continue
        if merged is None:
            merged = record
        else:
            merged["results"] += record["results"]
        merged["failed"] = failed
        target.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {target}" if merged else "no compressor was measured")
    return 1 if failed or merged is None else 0


def _without_option(args, name):
    if name not in args:
        return list(args)
    i = args.index(name)
    return list(args[:i]) + list(args[i + 2:])


def _bench_cli(args):
    """The CLI's JSON record, or None (the error printed)."""
    _alias_cli_package()
    import io
    from hvdcomp.cli.main import cli
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        try:
            code = cli.main(["bench", "compressors", *args, "--format", "json"],
                            prog_name="hvdcomp", standalone_mode=False)
        except SystemExit as exc:
            code = exc.code
        except Exception:
            traceback.print_exc(file=sys.stderr)
            code = 1
    if code:
        print(captured.getvalue(), file=sys.stderr)
        return None
    return json.loads(captured.getvalue())


def _alias_cli_package() -> None:
    """``hvdcomp.cli`` is the repository's ``cli/`` (pyproject's package-dir); without an
    installed copy, import it under that name from the source tree."""
    try:
        importlib.import_module("hvdcomp.cli.main")
        return
    except ImportError:
        pass
    import hvdcomp
    spec = importlib.util.spec_from_file_location(
        "hvdcomp.cli", REPO / "cli" / "__init__.py",
        submodule_search_locations=[str(REPO / "cli")])
    package = importlib.util.module_from_spec(spec)
    sys.modules["hvdcomp.cli"] = package
    hvdcomp.cli = package
    spec.loader.exec_module(package)


def _option(args, name, default):
    return args[args.index(name) + 1] if name in args else default


def _bench_library(args):
    """The CLI's record through hvdcomp.bench.compressors (no click or rich), or None."""
    import torch
    from hvdcomp.bench import compressors as bench
    device = _option(args, "--device", "cuda")
    try:
        results = bench.bench_compressors(
            bench.parse_spec_list(_option(args, "--compressors", "sign")),
            bench.parse_sizes(_option(args, "--sizes", "64")), device=device,
            warmup=int(_option(args, "--warmup", "1")),
            repeats=int(_option(args, "--repeats", "5")),
            finite_check=_option(args, "--finite-check", "always"))
    except Exception:
        traceback.print_exc()
        return None
    return {"machine": bench.machine_info(torch.device(device)),
            "results": [r.as_dict() for r in results], "via": "library (no click or rich)"}


# --- summary.md -----------------------------------------------------------------------------------
def _test_outcomes(out: Path):
    """[(test id, outcome)] from the minimal runner's JSON or pytest's -v log lines."""
    runner = out / "gpu-tests.json"
    if runner.exists():
        return [(r["test"], r["outcome"]) for r in json.loads(runner.read_text())]
    log = out / "pytest-gpu.log"
    if not log.exists():
        return []
    pattern = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
    return [(m.group(1), m.group(2).lower()) for m in map(pattern.match,
                                                             log.read_text().splitlines()) if m]


def _failure_sites(out: Path):
    """test name -> " (at hvdcomp/x.py:N: E-line)": the innermost hvdcomp frame of the failure
    and its first error line, from pytest's --tb=short sections in pytest-gpu.log."""
    log = out / "pytest-gpu.log"
    if not log.exists():
        return {}
    sites, name, frames, error = {}, None, [], ""
    header = re.compile(r"^_{3,} (test\S+) _{3,}$")
    for line in log.read_text(errors="replace").splitlines() + ["___ end ___"]:
        found = header.match(line)
        if found or line.startswith("="):
            if name and (frames or error):
                site = frames[-1] if frames else "?"
                sites[name] = f" (at {site}: {error[:160]})" if error else f" (at {site})"
            name, frames, error = (found.group(1) if found else None), [], ""
            continue
        frames += re.findall(r"(hvdcomp/[\w/]+\.py:\d+)", line)
        if line.startswith("E ") and not error:
            error = line[1:].strip()
    return sites


def _bench_table(out: Path):
    path = out / "bench-compressors-cuda.json"
    if not path.exists():
        return ["(no benchmark results: see gpu-check.log)"]
    record = json.loads(path.read_text())
    machine = record["machine"]
    lines = [f"device: {machine.get('gpu', machine.get('device'))}, torch {machine.get('torch')}"
             + (f"; FAILED: {', '.join(record['failed'])}" if record.get("failed") else ""),
             "", "| compressor | MiB | compress GB/s | decompress GB/s | c+d GB/s | "
             "copy GB/s | c+d / copy | bits/elem |", "|---|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        lines.append(f"| {r['compressor']} | {r['size_mib']:g} | {r['compress_gbps']:.1f} | "
                     f"{r['decompress_gbps']:.1f} | {r['roundtrip_gbps']:.1f} | "
                     f"{r['memcpy_gbps']:.1f} | {100 * r['roundtrip_vs_memcpy']:.1f} % | "
                     f"{r['bits_per_element']:.4g} |")
    return lines


def _targets(out: Path, outcomes):
    """The issue's two GPU targets, met or not, from the benchmark and the tests."""
    lines = []
    path = out / "bench-compressors-cuda.json"
    signs = [r for r in json.loads(path.read_text())["results"]
             if r["compressor"] == "sign"] if path.exists() else []
    for r in signs:
        ratio = r["roundtrip_vs_memcpy"]
        lines.append(f"- sign compress+decompress at {r['size_mib']:g} MiB: {100 * ratio:.1f} % of "
                     f"the device-to-device copy (target >= 50 %): "
                     f"{'met' if ratio >= 0.5 else 'NOT met'}")
    if not signs:
        lines.append("- sign compress+decompress: not measured")
    sync = [(test, outcome) for test, outcome in outcomes if "never_wait" in test]
    failed = [test for test, outcome in sync if outcome in ("failed", "error")]
    passed = sum(outcome == "passed" for _, outcome in sync)
    verdict = ("NOT met" if failed else "met" if passed else "not checked (tests skipped or "
               "not run)")
    lines.append(f"- no host sync in a round, a compressor call or an optimizer step "
                 f"({passed} passed, {len(failed)} failed of {len(sync)}): {verdict}")
    return lines


def summary(out: Path) -> int:
    lines = ["# gpu-check summary", ""]
    env_path = out / "env.json"
    if env_path.exists():
        facts = json.loads(env_path.read_text())
        lines += [f"- device: {facts.get('device', 'none')} (capability "
                  f"{facts.get('capability', '-')}), torch {facts['torch']}, CUDA "
                  f"{facts['torch_cuda']}, python {facts['python']}",
                  "- packages: " + ", ".join(f"{k} {v}" for k, v in facts["packages"].items())]
    steps = out / "steps.txt"
    if steps.exists():
        lines += ["", "## steps (exit status, seconds)", "", "```",
                  steps.read_text().rstrip(), "```"]
    outcomes = _test_outcomes(out)
    counts = {k: sum(o == k for _, o in outcomes) for k in ("passed", "failed", "error", "skipped")}
    lines += ["", "## GPU tests (pytest -m gpu tests/test_gpu_*.py)", "",
              "counts: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
    where = _failure_sites(out)
    lines += [f"- {outcome.upper()} {test}" + where.get(test.split("::")[-1], "")
              for test, outcome in outcomes if outcome in ("failed", "error")]
    lines += ["", "## issue 16's GPU targets", ""] + _targets(out, outcomes)
    lines += ["", "## compress + decompress against the device-to-device copy of the same buffer "
              "(`hvdcomp bench compressors --device cuda`; GB/s of fp32 input)", ""]
    lines += _bench_table(out)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv) -> int:
    if len(argv) < 2 or argv[0] not in ("env", "tests", "bench", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    command, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if command == "env":
        return env(out)
    if command == "tests":
        return tests(out, argv[2:])
    if command == "bench":
        return bench(out, argv[2:])
    with contextlib.suppress(BrokenPipeError):
        return summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
