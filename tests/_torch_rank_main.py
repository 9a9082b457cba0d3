"""Entry point of one rank started by tests/torchranks.py (not a test module)."""
import datetime
import importlib.util
import os
import pickle
import sys
import traceback
from pathlib import Path


def main(job_path: str) -> None:
    job = pickle.loads(Path(job_path).read_bytes())
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if job["backend"] == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        dist.init_process_group(job["backend"], timeout=datetime.timedelta(seconds=120))
        spec = importlib.util.spec_from_file_location(f"_torchrank_{Path(job['file']).stem}",
                                                      job["file"])
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(Path(job["file"]).parent))
        spec.loader.exec_module(module)
        result = getattr(module, job["func"])(**job["kwargs"])
        out = Path(job_path).with_name(f"result{rank}.pkl")
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(result))
        os.replace(tmp, out)
        from hvdcomp.comm.torchdist import destroy_process_groups
        destroy_process_groups()         # a test may have torn it down already (engine.stop)
    except BaseException:
        print(f"[rank {rank}] failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)  # the launcher ends the other ranks


if __name__ == "__main__":
    main(sys.argv[1])
