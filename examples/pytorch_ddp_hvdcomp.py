"""DistributedDataParallel with hvdcomp's hook: LIEC-SGD, 1-bit sign compression both ways.

    torchrun --nproc_per_node 2 examples/pytorch_ddp_hvdcomp.py            # Gloo on CPU
    torchrun --nproc_per_node 2 examples/pytorch_ddp_hvdcomp.py --algorithm psgd --compressor none

A plain DDP script; the hvdcomp lines are the `import hvdcomp.ddp` and the `register` call
(and, optionally, saving the hook's state with the checkpoint). No Horovod needed. Trains a
small MLP on a synthetic classification task (no download) and prints, on rank 0, the final
loss, the bytes this rank sent each way and a checksum of the parameters.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import hvdcomp
import hvdcomp.ddp


def make_data(rank: int, world: int, n: int = 512, dim: int = 32, classes: int = 4):
    # The task is the same on every rank (shared seed); each rank takes its own shard.
    gen = torch.Generator().manual_seed(1234)
    centers = torch.randn(classes, dim, generator=gen) * 2
    labels = torch.randint(0, classes, (n,), generator=gen)
    points = centers[labels] + torch.randn(n, dim, generator=gen)
    return points[rank::world], labels[rank::world]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--algorithm", default="liec")
    parser.add_argument("--compressor", default="sign")
    parser.add_argument("--checkpoint", help="save the model, optimizer and hook state here "
                        "(one file per rank: the error feedback is per rank)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 4)).to(device)
    model = DistributedDataParallel(net)
    state = hvdcomp.ddp.register(model, compression=hvdcomp.Compression.algorithm(
        args.algorithm, up=args.compressor))
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)

    x, y = (t.to(device) for t in make_data(rank, world))
    for _ in range(args.steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    if args.checkpoint:
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "hook": state}, f"{args.checkpoint}.rank{rank}")
    if rank == 0:
        checksum = sum(float(p.detach().double().sum()) for p in net.parameters())
        print(f"final loss {loss.item():.4f}  bytes up {state.stats.bytes_up}  "
              f"down {state.stats.bytes_down}  checksum {checksum:.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
