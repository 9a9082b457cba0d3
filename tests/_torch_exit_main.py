"""Run under torchrun by tests/test_comm_torchdist.py: a training script's order (hvdcomp
imported, the torch engine started, an optimizer built, the engine stopped), then the names of
the Gloo threads still running, which must be none."""
import os

import torch

import hvdcomp  # noqa: F401  (before the process group, as a training script imports it)
from hvdcomp.train import engine
from hvdcomp.train.config import detect_launcher

comm = engine.start("torch", detect_launcher())
torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1)   # imports torch._dynamo
comm.allreduce(torch.ones(3), "t.exit")
engine.stop(comm)
names = sorted(open(f"/proc/self/task/{task}/comm").read().strip()
               for task in os.listdir("/proc/self/task"))
print("gloo threads after stop", os.environ["RANK"], [n for n in names if "gloo" in n],
      flush=True)
