"""Your own model, optimizer and loop, trained by a distsgd algorithm on every rank of a job.

    torchrun --nproc-per-node=3 examples/custom_loop.py --algorithm ssp      # 1 server, 2 workers
    torchrun --nproc-per-node=4 examples/custom_loop.py --algorithm sgp      # 4 workers
    python examples/custom_loop.py --simulate 4 --algorithm ssp              # simulated ranks
    python examples/custom_loop.py                                           # a world of one

Each rank trains on its own shard of scikit-learn's digits; parameter-server algorithms take the
first ranks as servers. Rank-local output only: the consensus model's accuracy, printed by the
first worker. `--simulate N` runs the same `run_rank` on N simulated workers (plus the algorithm's
servers) in this process, through `distsgd.simulate_ranks`.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import distsgd


def run_rank(algorithm: distsgd.Algorithm, steps: int, comm: distsgd.Comm | None = None) -> None:
    """One rank's life; `comm` None: the run's own (torchrun's, or a world of one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    if distsgd.is_server(algorithm, comm):
        figures = distsgd.serve(model, algorithm, lr=algorithm.default_lr(), comm=comm)
        print(f"server done: staleness mean {figures['staleness_mean']:.2f}")
        return

    momentum = 0.9 if algorithm.local_momentum() else 0.0  # some bring momentum of their own
    optimizer = torch.optim.SGD(model.parameters(), lr=algorithm.default_lr(), momentum=momentum)
    opt = distsgd.DistributedOptimizer(model, optimizer, algorithm, comm=comm)
    ctx = opt.ctx
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    shard = torch.tensor(opt.shard(range(1500)).indices)  # this worker's part of the first 1500
    g = torch.Generator().manual_seed(ctx.index)
    for _ in range(steps):
        batch = shard[torch.randint(len(shard), (32,), generator=g)]
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
        opt.zero_grad()
    evaluated = opt.consensus_model()  # collective over the workers
    opt.finish()
    if ctx.index == 0:
        with torch.no_grad():
            accuracy = (evaluated(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
        print(f"{algorithm.name}: {ctx.workers} workers, held-out accuracy {accuracy:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithm", default="allreduce")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--simulate", type=int, metavar="N", default=0,
                        help="run N simulated workers (plus servers) in this process")
    args = parser.parse_args()

    algorithm = distsgd.create(args.algorithm)
    if args.simulate:
        distsgd.simulate_ranks(algorithm, args.simulate,
                               lambda comm, roles: run_rank(algorithm, args.steps, comm))
    else:
        run_rank(algorithm, args.steps)


if __name__ == "__main__":
    main()
