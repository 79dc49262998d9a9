"""A user's own training loop, shaped like PyTorch's MNIST example, trained by a distsgd algorithm:
a learning-rate scheduler on the DistributedOptimizer, a DataLoader sharded over the training
workers, the consensus model evaluated after each epoch.

    torchrun --standalone --nproc-per-node 2 examples/user_loop.py                  # 2 workers
    torchrun --standalone --nproc-per-node 4 examples/user_loop.py --algorithm ssp  # 1 server, 3
    python examples/user_loop.py                                                    # world of one

The lines distsgd adds to a plain loop are marked ``# distsgd``. Servers (the first ranks of a
parameter-server algorithm) run `distsgd.serve` instead of the loop and hold no data. Rank-local
output only: the first worker prints each epoch's learning rate and held-out accuracy.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

import distsgd


def digits() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits: the first 1500 to train on, the rest held out."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(data.target)
    return TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])


def accuracy(model: nn.Module, test_set: TensorDataset) -> float:
    x, y = test_set.tensors
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithm", default="allreduce")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=0.5, help="the lr's decay each epoch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    algorithm = distsgd.create(args.algorithm)  # distsgd
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    train_set, test_set = digits()
    if distsgd.is_server(algorithm):  # distsgd: a server rank serves until the workers finish
        distsgd.serve(model, algorithm, lr=args.lr)
        return

    momentum = 0.9 if algorithm.local_momentum() else 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=momentum)
    opt = distsgd.DistributedOptimizer(model, optimizer, algorithm)  # distsgd
    sampler = opt.sampler(train_set, seed=args.seed)  # distsgd: this worker's share, shuffled
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    scheduler = StepLR(opt, step_size=1, gamma=args.gamma)
    first = opt.ctx.index == 0  # distsgd: this worker's index among the training workers
    if first:
        print(f"{algorithm.name}: {opt.ctx.workers} workers, {len(sampler)} samples an epoch "
              "each")
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        lr = scheduler.get_last_lr()[0]  # the rate this epoch's steps used
        scheduler.step()
        evaluated = opt.consensus_model()  # distsgd: collective over the workers
        if first:
            print(f"epoch {epoch}: lr {lr:.4f}, held-out accuracy "
                  f"{accuracy(evaluated, test_set):.3f}", flush=True)
    opt.finish()  # distsgd: last; servers wait for it


if __name__ == "__main__":
    main()
