"""Simulator overhead: N simulated workers against the same steps in one plain PyTorch loop.

The simulator runs its workers one at a time, so N workers × S steps can never beat one plain loop
doing N·S forward/backward/optimizer steps on the same model and batch size; what the simulator
adds on top of that (greenlet switches, the scheduler, the algorithm's flatten/copy, the simulated
collectives) is its overhead. A third side, plain-N, steps N separate models round-robin in one
thread: what is left between it and the simulator is the simulator's own cost, not the price of N
models' state. Every side uses one torch thread and draws the very same batches from
`distsgd.data.batches`; repetitions are interleaved (plain, plain-N, sim, plain, ...) so that drift
in a noisy machine hits all alike, and medians are reported. Then one instrumented simulated run
splits the simulator's wall time into where it went (see `Probe`).

    .venv/bin/python -m benchmarks.sim_overhead                 # 64 workers x 100 steps, allreduce
    .venv/bin/python -m benchmarks.sim_overhead --algorithm sgp --repeats 3
    .venv/bin/python -m benchmarks.sim_overhead --compute-time none   # no elapse call per step
    .venv/bin/python -m benchmarks.sim_overhead --profile 25    # plus a cProfile of one sim run

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
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from greenlet import greenlet
from torch import nn

from distsgd import algorithms, data, models
from distsgd.algorithms.base import Algorithm
from distsgd.comm.base import Comm
from distsgd.comm.sim import NetworkModel, SimWorld
from distsgd.comm.sim.compute import ComputeModel
from distsgd.comm.sim.scheduler import Scheduler
from distsgd.optimizer import DistributedOptimizer, serve
from distsgd.roles import Roles
from distsgd.runtime import simulate_ranks

TARGET = 1.5  # sim / plain
SIDES = ("plain", "plain-N", "sim")


@dataclass(frozen=True)
class Setup:
    workers: int
    steps: int
    algorithm: str
    model: str
    dataset: data.Dataset
    batch_size: int
    sampling: str
    compute_time: str  # a ComputeModel spec, or "none" for no elapse call at all
    lr: float
    momentum: float
    seed: int

    def make_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return models.build(self.model, self.dataset.input_shape, self.dataset.num_classes)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum)

    def stream(self, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return data.batches(self.dataset, worker, self.workers, self.batch_size, self.seed,
                            self.sampling)


# --------------------------------------------------------------------------- the compared runs
@dataclass(frozen=True)
class Timing:
    """A timed region: wall-clock seconds, and this process's CPU seconds in it. Every side runs
    in one thread that never waits, so on a quiet machine the two agree; on a shared one, CPU
    time leaves out the time other processes had the core."""

    wall: float
    cpu: float

    @staticmethod
    def start() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    @classmethod
    def since(cls, started: tuple[float, float]) -> Timing:
        return cls(time.perf_counter() - started[0], time.process_time() - started[1])


def run_plain(s: Setup, per_worker: bool = False) -> Timing:
    """N·S steps in one thread; batches taken step-major from the N workers' streams, so the data
    side does exactly what the simulated workers do.

    One model is the honest baseline. ``per_worker`` keeps one model and optimizer per simulated
    worker instead, stepped round-robin: the floor any simulator of N workers could reach, since
    N models' weights, gradients and momenta no longer fit the caches that one model stays in.
    """
    nets: list[tuple[nn.Module, torch.optim.Optimizer]] = []
    for _ in range(s.workers if per_worker else 1):
        model = s.make_model()
        nets.append((model, s.make_optimizer(model)))
    streams = [s.stream(w) for w in range(s.workers)]
    started = Timing.start()
    for _ in range(s.steps):
        for w, stream in enumerate(streams):
            model, optimizer = nets[w % len(nets)]
            x, y = next(stream)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return Timing.since(started)


def run_sim(s: Setup, probe: Probe | None = None) -> Timing:
    """N simulated workers, each a DistributedOptimizer around its own model, S steps each, plus
    the algorithm's parameter servers if it has any (their work is the algorithm's cost)."""
    algorithm = algorithms.create(s.algorithm)
    compute = None if s.compute_time == "none" else ComputeModel.parse(s.compute_time)
    flops = models.forward_flops(s.make_model(), s.dataset.input_shape)
    # Streams are made outside the timed region on both sides (the plain loop does the same).
    streams = [s.stream(w) for w in range(s.workers)]

    def body(comm: Comm, roles: Roles) -> None:
        if probe is not None:
            probe.begin()
        model = s.make_model()
        if roles.is_server(comm.rank):
            if probe is not None:
                probe.phase(SERVE)
            serve(model, algorithm, lr=s.lr, comm=comm, seed=s.seed)
            if probe is not None:
                probe.end()
            return
        opt = DistributedOptimizer(model, s.make_optimizer(model), algorithm, comm=comm,
                                   seed=s.seed)
        stream = streams[roles.index(comm.rank)]
        for _ in range(s.steps):
            if probe is not None:
                probe.phase(COMPUTE)
            started = time.perf_counter()
            x, y = next(stream)
            F.cross_entropy(model(x), y).backward()
            if compute is not None:
                # As train.worker_loop does: charge the step's compute time to the virtual clock.
                comm.elapse(compute.step_seconds(flops, len(y), time.perf_counter() - started))
            if probe is not None:
                probe.phase(STEP)
            opt.step()
            if probe is not None:
                probe.phase(None)
            opt.zero_grad()
        opt.finish()  # parameter servers serve until every worker has said goodbye
        if probe is not None:
            probe.end()

    started = Timing.start()
    simulate_ranks(algorithm, s.workers, body, network=NetworkModel())
    return Timing.since(started)


# ------------------------------------------------------------------------------ the breakdown
# The phases of a simulated worker's life (a server has only its setup and its serve loop).
SETUP, COMPUTE, STEP, SERVE = "setup", "compute", "step", "serve"


class Probe:
    """Accounts one instrumented simulated run's wall time to where it went.

    Only one simulated worker runs at a time, so the run's wall time is the sum of the workers'
    active spans plus what happens between them (the scheduler and the greenlet switches).
    Every timer here is exclusive of the time its worker spends parked in `SimWorld._yield`: that
    time belongs to whichever worker runs meanwhile. Wrapped calls are charged to the phase the
    worker is in, so the setup's broadcast is not mistaken for the steps' all-reduces.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.yields = 0
        self.num_threads: set[int] = set()
        # Per worker: the workers are greenlets of one thread, so a threading.local would not do.
        self._workers: dict[greenlet, SimpleNamespace] = {}
        self._restore: list[tuple[Any, str, Any]] = []

    @property
    def _local(self) -> SimpleNamespace:
        """The running worker's own timers."""
        return self._workers.setdefault(greenlet.getcurrent(), SimpleNamespace())

    def _parked(self) -> float:
        return getattr(self._local, "parked", 0.0)

    def _phase(self) -> str | None:
        return getattr(self._local, "phase", SETUP)

    def _add(self, key: str, seconds: float) -> None:
        # No lock: only one worker (or the scheduler) runs at a time, all in one thread.
        self.seconds[key] += seconds

    def begin(self) -> None:
        """A worker starts: its active span and its setup phase begin."""
        self.num_threads.add(torch.get_num_threads())
        self._local.parked, self._local.phase = 0.0, SETUP
        now = time.perf_counter()
        self._local.began, self._local.since, self._local.since_parked = now, now, 0.0

    def phase(self, phase: str | None) -> None:
        """Close the current phase (charging its span) and open `phase` (None: between phases)."""
        now, parked = time.perf_counter(), self._parked()
        if self._local.phase is not None:
            self._add(f"phase {self._local.phase}",
                      now - self._local.since - (parked - self._local.since_parked))
        self._local.phase, self._local.since, self._local.since_parked = phase, now, parked

    def end(self) -> None:
        self.phase(None)
        self._add("active", time.perf_counter() - self._local.began - self._parked())

    def patch(self, owner: Any, name: str, key: str) -> None:
        """Wrap ``owner.name`` so that its calls are timed, per phase, exclusive of parked time."""
        original = getattr(owner, name)
        probe = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            phase, parked, started = probe._phase(), probe._parked(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                probe._add(f"{key} {phase}",
                           time.perf_counter() - started - (probe._parked() - parked))

        self._restore.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, timed)

    def patch_yield(self) -> None:
        original = SimWorld._yield
        probe = self

        def counted(world: Scheduler, w: Any) -> None:
            started = time.perf_counter()
            try:
                original(world, w)
            finally:
                probe._local.parked = probe._parked() + time.perf_counter() - started
                probe.yields += 1

        self._restore.append((SimWorld, "_yield", original))
        SimWorld._yield = counted  # type: ignore[method-assign,assignment]

    def install(self, algorithm: type[Algorithm]) -> None:
        self.patch_yield()
        for verb in ("collective", "deliver", "recv", "poll", "elapse"):
            if hasattr(SimWorld, verb):  # poll arrived with the asynchronous algorithms
                self.patch(SimWorld, verb, "comm" if verb != "elapse" else "elapse")
        # Patched on the algorithm's own class: an inherited hook gets a wrapper on the subclass
        # (removed again by uninstall), which leaves the base class and other algorithms alone.
        for hook in ("after_backward", "after_step"):
            self.patch(algorithm, hook, "hooks")

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._restore):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._restore.clear()

    def breakdown(self, wall: float) -> list[tuple[str, float]]:
        """Rows (what, seconds) that add up to the instrumented run's wall time."""
        sec = self.seconds
        phases = sum(sec[f"phase {p}"] for p in (SETUP, COMPUTE, STEP, SERVE))
        rows = [
            ("setup: models, DistributedOptimizer, first broadcast", sec[f"phase {SETUP}"]),
            ("data + forward + backward", sec[f"phase {COMPUTE}"] - sec[f"elapse {COMPUTE}"]),
            ("SimWorld.elapse (clock, _is_next scan)", sec[f"elapse {COMPUTE}"]),
            ("local optimizer step", sec[f"phase {STEP}"] - sec[f"hooks {STEP}"]),
            ("algorithm hooks minus comm (flatten, cat, copy back)",
             sec[f"hooks {STEP}"] - sec[f"comm {STEP}"]),
            ("SimWorld collective/send/recv/poll (reduce, copies, scans)", sec[f"comm {STEP}"]),
            ("zero_grad + finish + loop", sec["active"] - phases),
            ("scheduler + greenlet switches (wall - workers' active)", wall - sec["active"]),
        ]
        if sec[f"phase {SERVE}"]:
            rows.insert(-1, ("parameter servers' serve loops (with their comm)",
                             sec[f"phase {SERVE}"]))
        return rows


def interleaved(s: Setup, repeats: int) -> dict[str, list[Timing]]:
    times: dict[str, list[Timing]] = {side: [] for side in SIDES}
    for _ in range(repeats):  # interleaved: plain, plain-N, sim, plain, plain-N, sim, ...
        times["plain"].append(run_plain(s))
        times["plain-N"].append(run_plain(s, per_worker=True))
        times["sim"].append(run_sim(s))
    return times


def instrumented(s: Setup) -> tuple[float, Probe]:
    probe = Probe()
    probe.install(type(algorithms.create(s.algorithm)))
    try:
        wall = run_sim(s, probe).wall
    finally:
        probe.uninstall()
    return wall, probe


def profile_sim(s: Setup, top: int) -> str:
    """cProfile of one simulated run: the workers are greenlets of this thread, so one profiler
    sees them all and the scheduler."""
    main = cProfile.Profile()
    main.enable()
    try:
        run_sim(s)
    finally:
        main.disable()
    out = io.StringIO()
    stats = pstats.Stats(main, stream=out)
    out.write("(a switch to another worker shows as greenlet.switch; its cumulative time is the\n"
              " other workers' work, so read only its own time as the switch's cost)\n")
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--steps", type=int, default=100, help="steps per simulated worker")
    p.add_argument("--algorithm", default="allreduce", choices=sorted(algorithms.REGISTRY))
    p.add_argument("--model", default="mlp", choices=models.MODELS)
    p.add_argument("--dataset", default="digits", choices=data.DATASETS)
    p.add_argument("--batch-size", type=int, default=32)
    # digits has 1,438 training images: 64 disjoint shards hold 22-23, less than one batch of 32,
    # so the default lets every worker sample the whole set.
    p.add_argument("--sampling", default="iid", choices=data.SAMPLINGS)
    p.add_argument("--compute-time", default="flops",
                   help="virtual compute time charged per step, as `distsgd train` takes it "
                        "(flops, flops:RATE, measured, SECONDS), or 'none' for no elapse call")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions of each side")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also cProfile one simulated run and print its top N functions")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    s = Setup(args.workers, args.steps, args.algorithm, args.model, data.load(args.dataset),
              args.batch_size, args.sampling, args.compute_time, lr=0.05, momentum=0.9, seed=0)
    total = s.workers * s.steps
    print(f"{s.workers} simulated workers x {s.steps} steps of {s.model} on {s.dataset.name} "
          f"(batch {s.batch_size}, {s.sampling}, {s.algorithm}, compute time {s.compute_time}) "
          f"vs one plain loop of {total} steps; torch threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repetitions\n")
    run_plain(dataclasses.replace(s, steps=2))  # warm-up: allocator, autograd, first call
    run_sim(dataclasses.replace(s, steps=2))
    times = interleaved(s, args.repeats)
    med = {side: statistics.median(t.wall for t in times[side]) for side in SIDES}
    cpu = {side: statistics.median(t.cpu for t in times[side]) for side in SIDES}
    mp = med["plain"]
    print(f"{'':<9}{'median s':>10}{'us/step':>10}{'x plain':>9}{'cpu x':>7}   runs (s)")
    for side in SIDES:
        print(f"{side:<9}{med[side]:>10.3f}{med[side] / total * 1e6:>10.1f}"
              f"{med[side] / mp:>9.2f}{cpu[side] / cpu['plain']:>7.2f}   "
              + " ".join(f"{t.wall:.3f}" for t in times[side]))
    print(f"(plain: one model; plain-N: {s.workers} models stepped round-robin in one thread, "
          "the floor for any simulator; cpu x: the same ratio in CPU time, which leaves out "
          "other processes' share of a busy machine)")
    paired = [sim.wall / plain.wall for sim, plain in zip(times["sim"], times["plain"],
                                                           strict=True)]
    print("sim/plain per repetition: " + " ".join(f"{r:.2f}" for r in paired)
          + f" (spread {max(paired) - min(paired):.2f}); in CPU time: "
          + " ".join(f"{sim.cpu / plain.cpu:.2f}"
                     for sim, plain in zip(times["sim"], times["plain"], strict=True)))
    ratio = med["sim"] / mp
    verdict = "meets" if ratio <= TARGET else "misses"
    print(f"\nratio sim/plain = {ratio:.2f}  (target <= {TARGET}: {verdict} it); "
          f"sim/plain-N = {med['sim'] / med['plain-N']:.2f}\n")

    wall, probe = instrumented(s)
    print(f"breakdown of one instrumented sim run ({wall:.3f} s wall; timers add some overhead; "
          f"{probe.yields} yields to the scheduler = {probe.yields / total:.2f} per worker-step, "
          f"torch threads in workers {sorted(probe.num_threads)}):")
    print(f"{'':<62}{'s':>8}{'share':>8}{'us/step':>10}")
    for what, seconds in probe.breakdown(wall):
        print(f"{what:<62}{seconds:>8.3f}{seconds / wall:>8.1%}{seconds / total * 1e6:>10.1f}")
    print(f"{'(plain loop, same steps: median)':<62}{mp:>8.3f}{mp / wall:>8.1%}"
          f"{mp / total * 1e6:>10.1f}")

    if args.profile:
        print(f"\ncProfile of one simulated run, top {args.profile} by own time:")
        print(profile_sim(s, args.profile))


if __name__ == "__main__":
    main()
