"""The same script with hvdcomp: LIEC-SGD with 1-bit sign compression in both directions.

    mpirun -np 2 python examples/train_hvdcomp.py

The only changes from train_horovod.py: `import hvdcomp` and the DistributedOptimizer line.

Trains a small MLP on a synthetic classification task (no download) and prints the final loss
and a checksum of the parameters on rank 0.
"""
import argparse

import horovod.torch as hvd
import hvdcomp
import torch
import torch.nn.functional as F


def make_data(rank: int, n: int = 512, dim: int = 32, classes: int = 4):
    # The task is the same on every rank (shared seed); each rank takes its own shard.
    gen = torch.Generator().manual_seed(1234)
    centers = torch.randn(classes, dim, generator=gen) * 2
    labels = torch.randint(0, classes, (n,), generator=gen)
    points = centers[labels] + torch.randn(n, dim, generator=gen)
    return points[rank::hvd.size()], labels[rank::hvd.size()]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)

    hvd.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    optimizer = hvdcomp.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=hvdcomp.Compression.liec("sign"))

    points, labels = make_data(hvd.rank())
    for step in range(args.steps):
        batch = slice((step * 32) % len(points), (step * 32) % len(points) + 32)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(points[batch]), labels[batch])
        loss.backward()
        optimizer.step()

    accuracy = (model(points).argmax(1) == labels).float().mean()
    accuracy = hvd.allreduce(accuracy, name="accuracy").item()
    if hvd.rank() == 0:
        checksum = sum(p.double().sum().item() for p in model.parameters())
        print(f"final loss {loss.item():.4f} accuracy {accuracy:.3f} checksum {checksum:.6f}")


if __name__ == "__main__":
    main()
