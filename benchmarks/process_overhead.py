"""Real-process overhead: distsgd's `allreduce` against PyTorch DDP, same processes, same work.

Both sides run in processes started by `distsgd.launch.launch` (gloo, one torch thread per
process): the same model, the same per-rank batches from `distsgd.data.batches`, the same SGD, the
same number of steps. DDP wraps the model on the default process group the launcher initialised;
distsgd wraps the optimizer in `DistributedOptimizer` with the `TorchComm` it is given. Only the
training loop is timed, after a warm-up and a barrier, so process start-up and gloo's rendezvous
are not counted; a run's time is its slowest rank's. Runs alternate (DDP, distsgd, DDP, ...) so a
noisy machine hits both alike, and medians are reported.

    .venv/bin/python -m benchmarks.process_overhead                  # mlp on digits, 300 steps
    .venv/bin/python -m benchmarks.process_overhead --model cnn --steps 200
    .venv/bin/python -m benchmarks.process_overhead --profile 20     # plus a cProfile of rank 0

It prints figures and never fails on them: wall-clock limits do not belong in assertions.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distsgd import data, models
from distsgd.comm.torch import TorchComm
from distsgd.launch import launch
from distsgd.optimizer import DistributedOptimizer

TARGET = 1.10  # distsgd / DDP
SIDES = ("ddp", "distsgd")


@dataclass(frozen=True)
class Setup:
    model: str
    dataset: str
    steps: int
    warmup: int
    batch_size: int
    lr: float
    momentum: float
    seed: int
    instrument: bool = False  # time distsgd's pieces (a separate run: timers cost a little)
    profile: int = 0  # rank 0 returns a cProfile of its timed loop, top N functions


# ------------------------------------------------------------------------- in the workers
def worker(comm: TorchComm, side: str, s: Setup) -> dict[str, Any]:
    """One rank of one run; module level so that `launch` can pickle it by reference."""
    dataset = data.load(s.dataset)
    torch.manual_seed(s.seed)
    model = models.build(s.model, dataset.input_shape, dataset.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum)
    batches = data.batches(dataset, comm.rank, comm.world_size, s.batch_size, s.seed)
    probe = _Probe() if s.instrument and side == "distsgd" else None

    if side == "ddp":
        net: nn.Module = DistributedDataParallel(model)  # CPU: no device_ids; default group

        def step() -> None:
            x, y = next(batches)
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    else:
        opt = DistributedOptimizer(model, optimizer, "allreduce", comm=comm, seed=s.seed)
        if probe is not None:
            probe.install(type(opt.algorithm))

        def step() -> None:
            x, y = next(batches)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    for _ in range(s.warmup):
        step()
    # Both sides start the clock together; the barrier itself is not timed.
    dist.barrier()
    profiler = cProfile.Profile() if s.profile and comm.rank == 0 else None
    if probe is not None:
        probe.seconds.clear()
    if profiler is not None:
        profiler.enable()
    started = time.perf_counter()
    for _ in range(s.steps):
        step()
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
    result: dict[str, Any] = {"rank": comm.rank, "seconds": seconds}
    if probe is not None:
        probe.uninstall()
        result["breakdown"] = dict(probe.seconds)
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(s.profile)
        result["profile"] = out.getvalue()
    return result


class _Probe:
    """Inclusive timers around the layers of distsgd's all-reduce path, inside one worker.

    Nesting: algorithm hook > TorchComm.all_reduce_ > TorchComm._run (gloo's all_reduce + wait),
    so each layer's own cost is its time minus the next one's.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._restore: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, name: str, key: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)
        seconds = self.seconds

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - started

        self._restore.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, timed)

    def install(self, algorithm: type[Any]) -> None:
        self._wrap(algorithm, "after_backward", "hook")
        self._wrap(TorchComm, "all_reduce_", "all_reduce_")
        self._wrap(TorchComm, "_run", "gloo")
        self._wrap(torch.Tensor, "backward", "backward")
        self._wrap(torch.optim.SGD, "step", "sgd")

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._restore):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._restore.clear()


# ---------------------------------------------------------------------------- the driver
def run(side: str, s: Setup) -> list[dict[str, Any]]:
    return launch(worker, 2, args=(side, s), timeout=600.0)


def breakdown_rows(results: list[dict[str, Any]]) -> list[tuple[str, list[float]]]:
    """(what, seconds on each rank) for an instrumented run; the rows add up to the loop time."""
    rows: list[tuple[str, list[float]]] = []
    for what, seconds in (
        ("backward (autograd)", lambda b: b["backward"]),
        ("SGD.step (the local optimizer)", lambda b: b["sgd"]),
        ("allreduce hook minus all_reduce_ (cat, split, copy back)",
         lambda b: b["hook"] - b["all_reduce_"]),
        ("TorchComm.all_reduce_ minus gloo (checks, byte counting)",
         lambda b: b["all_reduce_"] - b["gloo"]),
        ("gloo all_reduce + wait", lambda b: b["gloo"]),
    ):
        rows.append((what, [seconds(r["breakdown"]) for r in results]))
    rest = [r["seconds"] - sum(row[1][i] for row in rows) for i, r in enumerate(results)]
    rows.append(("rest: data, forward, zero_grad, loop", rest))
    rows.append(("timed loop (total)", [r["seconds"] for r in results]))
    return rows


def slowest(results: list[dict[str, Any]]) -> float:
    return max(r["seconds"] for r in results)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=models.MODELS)
    p.add_argument("--dataset", default="digits", choices=data.DATASETS)
    p.add_argument("--steps", type=int, default=300, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before the clock starts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side")
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip the extra instrumented distsgd run")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also cProfile rank 0 of one run of each side, top N functions")
    args = p.parse_args(argv)

    s = Setup(args.model, args.dataset, args.steps, args.warmup, args.batch_size, lr=0.05,
              momentum=0.9, seed=0)
    print(f"2 processes (gloo, 1 torch thread each), {s.model} on {s.dataset}, batch {s.batch_size}"
          f" per rank, {s.steps} timed steps after {s.warmup} warm-up; DDP vs distsgd allreduce, "
          f"{args.repeats} alternating runs each; a run's time is its slowest rank's\n")
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        for side in SIDES:
            times[side].append(slowest(run(side, s)))
    med = {side: statistics.median(times[side]) for side in SIDES}
    print(f"{'':<9}{'median s':>10}{'steps/s':>10}{'ms/step':>10}   runs (s)")
    for side in SIDES:
        print(f"{side:<9}{med[side]:>10.3f}{s.steps / med[side]:>10.1f}"
              f"{med[side] / s.steps * 1e3:>10.3f}   " + " ".join(f"{t:.3f}" for t in times[side]))
    ratio = med["distsgd"] / med["ddp"]
    verdict = "meets" if ratio <= TARGET else "misses"
    print(f"\nratio distsgd/DDP = {ratio:.3f}  (target <= {TARGET}: {verdict} it)")

    if not args.no_breakdown:
        results = run("distsgd", dataclasses.replace(s, instrument=True))
        print("\nbreakdown of one instrumented distsgd run, per rank (timers add a little; a "
              "rank's gloo wait includes waiting for the other rank to arrive):")
        print(f"{'us/step':<60}" + "".join(f"{'rank ' + str(r['rank']):>10}" for r in results))
        for what, per_rank in breakdown_rows(results):
            print(f"{what:<60}" + "".join(f"{v / s.steps * 1e6:>10.1f}" for v in per_rank))

    if args.profile:
        for side in SIDES:
            results = run(side, dataclasses.replace(s, profile=args.profile))
            print(f"\ncProfile of rank 0's timed loop, {side}, top {args.profile} by own time:")
            print(results[0]["profile"])


if __name__ == "__main__":
    main()
