#!/usr/bin/env python
"""Run every point of a sweep spec on this machine, one after the other, without Slurm.

    .venv/bin/python scripts/run_sweep_local.py jobs/reproduce-dgc.toml
    .venv/bin/hvdcomp collect runs/reproduce-dgc --format markdown

Each point runs as ``mpirun -np <ranks> --oversubscribe hvdcomp train <its options> --out
<sweep>/runs/<point> --quiet`` (a single process when ranks = 1), in the same run directories
``hvdcomp slurm submit`` would use, so ``hvdcomp collect`` reads either.  A point whose run
directory already holds a summary.json is skipped (re-running the script finishes a sweep);
``--force`` runs it again.  ``--only TEXT`` keeps the points whose name contains TEXT.  The
spec's [cluster] table is ignored; its [cluster.env] variables are exported.  Exit status 1 when a
point failed (the others still run), 2 for a bad spec.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: loopback-only Open MPI settings (as tests/multirank.py uses): no probing for fast networks
MPI_ENV = {"OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo",
           "OMPI_MCA_oob_tcp_if_include": "lo", "OMPI_MCA_pml": "ob1",
           "OMPI_MCA_btl_base_warn_component_unused": "0", "OMP_NUM_THREADS": "1"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--only", default=None, help="run the points whose name contains this")
    parser.add_argument("--force", action="store_true", help="re-run finished points")
    args = parser.parse_args()

    from hvdcomp.errors import UserError
    from hvdcomp.slurm_render import sweep_paths
    from hvdcomp.sweep import load_spec, train_arguments
    try:
        spec = load_spec(args.spec)
    except UserError as exc:
        print(f"run_sweep_local: {exc}", file=sys.stderr)
        return 2
    paths = sweep_paths(spec)
    hvdcomp = Path(sys.executable).with_name("hvdcomp")
    env = {**os.environ, **MPI_ENV, **dict(spec.cluster.env or ())}
    # every rank shares this machine's cores (oversubscribed): a rank that starts or evaluates
    # minutes late is slow, not stalled
    env.setdefault("HVDCOMP_STALL_TIMEOUT", "900")
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    failed = []
    for point in spec.points:
        if args.only and args.only not in point.name:
            continue
        out = paths.run_dir(point.name)
        if (out / "summary.json").exists() and not args.force:
            print(f"= {point.name}: done already", flush=True)
            continue
        argv = [str(hvdcomp), "train", *train_arguments(point, spec.train_options),
                "--out", str(out), "--overwrite", "--quiet"]
        if point.ranks > 1:
            argv = [shutil.which("mpirun") or "mpirun", "-np", str(point.ranks),
                    "--oversubscribe", *argv]
        began = time.perf_counter()
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
        took = time.perf_counter() - began
        if result.returncode:
            failed.append(point.name)
            print(f"! {point.name}: exit {result.returncode} after {took:.0f} s\n"
                  f"{result.stdout[-2000:]}{result.stderr[-2000:]}", flush=True)
        else:
            print(f"+ {point.name}: {took:.0f} s", flush=True)
    if failed:
        print(f"run_sweep_local: {len(failed)} point(s) failed: {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
