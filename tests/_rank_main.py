"""Entry point of one rank started by tests/multirank.py (not a test module)."""
import importlib.util
import os
import pickle
import sys
import traceback
from pathlib import Path


def main(job_path: str) -> None:
    job = pickle.loads(Path(job_path).read_bytes())
    import horovod.torch as hvd

    hvd.init()
    rank = hvd.rank()
    try:
        spec = importlib.util.spec_from_file_location(f"_ranktest_{Path(job['file']).stem}",
                                                      job["file"])
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(Path(job["file"]).parent))
        spec.loader.exec_module(module)
        result = getattr(module, job["func"])(**job["kwargs"])
        out = Path(job_path).with_name(f"rank{rank}.pkl")
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(result))
        os.replace(tmp, out)
        hvd.shutdown()
    except BaseException:
        print(f"[rank {rank}] failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        # Do not wait for the other ranks at a collective they may never reach: leave now, and
        # let the launcher tear the job down (mpirun aborts the job when a rank exits non-zero).
        os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1])
