import os
import sys
from pathlib import Path

# tests/ helpers (multirank, oracle) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, on a machine without a CUDA device
    (scripts/gpu-check.sh runs them where there is one). Torch is imported only when some
    collected test carries the marker."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests:
        return
    import pytest
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marker gpu: needs a CUDA device (torch.cuda.is_available() "
                                   "is False on this machine); scripts/gpu-check.sh runs these")
    for item in gpu_tests:
        item.add_marker(skip)
