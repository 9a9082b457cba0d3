"""hvdcomp.threads.share_cores: ranks on one node split its cores; OMP_NUM_THREADS wins."""
import os

import torch

from hvdcomp.threads import share_cores


def test_ranks_share_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    old = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert share_cores(1) == max(1, os.cpu_count() or 1)
        assert share_cores(10 * (os.cpu_count() or 1)) == 1          # never below one thread
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert share_cores(1) == 1                                   # the user's choice stands
    finally:
        torch.set_num_threads(old)
