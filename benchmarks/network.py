"""Every algorithm on a bandwidth-shaped network: H hosts × P processes, torchrun, tc tbf.

Network namespaces (distsgd.testing.netns) play the machines: two are joined by a veth pair, more
by a bridge in a switch namespace; every host's egress (and, with a switch, every switch port's)
is shaped by a token-bucket filter to each rate of ``--rates``. On each rate ONE torchrun job
(``--per-host`` processes on each of ``--hosts`` hosts, c10d rendezvous on host 0) runs every
algorithm in turn, then PyTorch DistributedDataParallel, all on the same model (a wide MLP,
communication-bound by design), the same batches and at least ``--samples`` samples (an
algorithm whose run would last under ``--min-seconds`` runs on a multiple of them; each row says
how many). One job per rate keeps process start-up (half a minute here) out of the budget;
algorithms run one after another on fresh communicators. ``--slow-host H:FACTOR`` makes torchrun
node H's steps take FACTOR× as long (its workers sleep (FACTOR − 1) × their forward/backward time
after it, as `distsgd train --straggler` does on real processes), DDP's too.

Per algorithm it prints wall time per 1,000 samples (from a barrier to the last rank's last step),
bytes sent per worker (the Comm layer's counts; DDP's are the ring all-reduce's), the final test
accuracy of the evaluated model, and ratios to `allreduce` and to DDP. Then the simulator's
prediction for the same set-up (`benchmarks.calibrate`) next to each measurement.

    .venv/bin/python -m benchmarks.network                     # 2 × 2, 100 Mbit/s and 1 Gbit/s
    .venv/bin/python -m benchmarks.network --rates 100 --algorithms allreduce,sgp
    .venv/bin/python -m benchmarks.network --hosts 4 --per-host 1 --slow-host 1:3
    .venv/bin/python -m benchmarks.network --json results.json # keep the figures

Needs root (network namespaces). It prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.network_probes import probe, transfer_cpu_probe
from benchmarks.network_report import layout, print_table, probes, summarize
from distsgd import algorithms, data
from distsgd.comm.base import Comm
from distsgd.errors import UsageError
from distsgd.optimizer import DistributedOptimizer, serve
from distsgd.roles import Roles
from distsgd.testing import netns

# OSGP next to sgp (issue 11's 1 Gbit/s target is on it); hierarchical crossover with one group
# per machine next to the flat one.
DEFAULT_ALGORITHMS = ("allreduce,sgp,sgp:overlap=true,crossover,crossover:groups=-1,local-sgd,"
                      "easgd,gosgd,downpour,ssp,easgd-async,eamsgd,async-sparse")


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration (the same for every algorithm and for the simulator)."""

    width: int = 512  # hidden units of the MLP: 64·W + W² + 10·W parameters
    dataset: str = "digits"
    samples: int = 6400  # per algorithm, all workers together (at least; see min_seconds)
    batch_size: int = 32
    momentum: float = 0.9
    seed: int = 0
    timeout: float = 300.0  # seconds any one communication may wait
    repeats: int = 2  # every algorithm (and DDP) runs this often, alternating; medians reported
    hosts: int = 2  # machines: network namespaces
    per_host: int = 2  # torchrun processes on each
    slow_host: tuple[int, float] | None = None  # (torchrun node, factor): its steps factor× longer
    # An algorithm whose run of `samples` lasts less is run on as many times more samples as make
    # it last about this long (`longer`): a run of 0.2 s (gosgd's) measures its start and end
    # more than its steps. Each row records its own `samples` (accuracy then differs with them).
    min_seconds: float = 1.0

    @classmethod
    def load(cls, fields: dict[str, Any]) -> Setup:
        """From `asdict` through JSON (which turns the tuple into a list)."""
        slow = fields.get("slow_host")
        return cls(**{**fields, "slow_host": tuple(slow) if slow is not None else None})

    def slowdown(self, node: int) -> float:
        """The factor by which torchrun node `node`'s steps are slowed down (1: not at all)."""
        return self.slow_host[1] if self.slow_host and self.slow_host[0] == node else 1.0


def wide_mlp(width: int, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """models.py's `mlp`, wider: communication-bound at 100 Mbit/s–1 Gbit/s."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'name' or 'name:key=value,...' (hyperparameters as `--set` takes them)."""
    name, _, rest = spec.partition(":")
    items = [item.split("=", 1) for item in rest.split(";") if item]
    if any(len(item) != 2 for item in items):
        raise UsageError(f"--algorithms: {spec!r} is not name or name:key=value;key=value")
    settings = {key: value for key, value in items}
    algorithms.create(name, settings)  # raises UsageError naming the problem
    return name, settings


def steps_for(setup: Setup, workers: int, samples: int | None = None) -> int:
    return math.ceil((samples or setup.samples) / (workers * setup.batch_size))


def longer(setup: Setup, seconds: float) -> int | None:
    """The samples to run an algorithm on whose run of `setup.samples` took `seconds`, so that it
    lasts about `setup.min_seconds` (a whole multiple of `setup.samples`; one estimate, from that
    run: not checked again); None: as it is."""
    factor = math.ceil(setup.min_seconds / max(seconds, 1e-3))
    return setup.samples * factor if factor > 1 else None


# ------------------------------------------------------------------------ one algorithm
def run_algorithm(comm: Comm, setup: Setup, spec: str, dataset: data.Dataset,
                  charge: tuple[float, ...] | None = None,
                  samples: int | None = None) -> dict[str, Any]:
    """This rank's part of one algorithm's run; the same code in the simulator and for real.

    `charge`: the seconds to charge per step with `comm.elapse` (the simulator): the forward/
    backward pass, then the local work of the optimizer step (the algorithm's tensor math, the
    Comm layer's copies), then (optional) the rest of the loop (the next batch: `_outside`);
    None charges what was measured (a no-op on real processes). The local work is measured as
    this thread's CPU time inside `opt.step` (waiting for the network costs none), scaled by how
    much slower than its CPU time the forward/backward pass ran: on a shared machine the work
    waits for a core too. Each part's CPU time is recorded as well (`cpu_per_step`: what it
    costs on a core of its own). A worker of the slow host (`Setup.slow_host`) sleeps after its
    forward/backward pass for (factor − 1) times its duration. A worker's loop is timed from its
    first step (after the initial broadcast, and a barrier where there are no servers) to its
    last, in real and in virtual time; the evaluated model is then gathered (untimed, uncounted).
    Servers report their bytes only. `samples`: all workers' (None: `setup.samples`).
    """
    name, settings = parse_spec(spec)
    algorithm = algorithms.create(name, settings)
    roles = Roles.of_world(algorithm, comm.world_size)
    workers = roles.workers
    lr = algorithm.default_lr()
    torch.manual_seed(setup.seed)
    model = wide_mlp(setup.width, dataset.input_shape, dataset.num_classes)
    out: dict[str, Any] = {"rank": comm.rank, "spec": spec, "workers": len(workers)}
    if roles.is_server(comm.rank):
        serve(model, algorithm, lr=lr, comm=comm, seed=setup.seed)
        return {**out, "role": "server", "bytes": comm.bytes_sent}
    index = roles.index(comm.rank)
    momentum = setup.momentum if algorithm.local_momentum() else 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    opt = DistributedOptimizer(model, optimizer, algorithm, comm=comm, seed=setup.seed)
    batches = data.batches(dataset, index, len(workers), setup.batch_size, setup.seed, "shard")
    steps = steps_for(setup, len(workers), samples)
    nodes = getattr(comm, "nodes", None)  # TorchComm and SimComm have them (AlgoContext.nodes)
    slow = setup.slowdown(nodes[comm.rank]) if nodes else 1.0
    compute = compute_cpu = local_cpu = in_step = outside_cpu = 0.0
    if len(workers) == comm.world_size:  # no servers to wait for: every loop starts together
        comm.barrier()  # (the initial broadcast releases ranks up to a model's transfer apart)
    started, virtual = time.perf_counter(), comm.now()  # after the initial broadcast
    for _ in range(steps):
        c_batch = time.thread_time()
        x, y = next(batches)
        t0, c0 = time.perf_counter(), time.thread_time()
        outside_cpu += c0 - c_batch
        F.cross_entropy(model(x), y).backward()
        spent = time.perf_counter() - t0
        compute, compute_cpu = compute + spent, compute_cpu + time.thread_time() - c0
        if charge is None and slow > 1.0:
            time.sleep((slow - 1.0) * spent)  # a real slow host (the simulator is charged it)
        comm.elapse(spent if charge is None else charge[0] + sum(charge[2:]))
        c1, t1 = time.thread_time(), time.perf_counter()
        opt.step()
        opt.zero_grad()
        local_cpu += time.thread_time() - c1
        in_step += time.perf_counter() - t1
        comm.elapse(0.0 if charge is None else charge[1])
    # CPU time in opt.step, stretched as much as the forward/backward passes were (whole run).
    local = local_cpu * max(compute / max(compute_cpu, 1e-9), 1.0)
    seconds, clock, sent = time.perf_counter() - started, comm.now(), comm.bytes_sent
    if clock is not None and virtual is not None:
        clock -= virtual
    evaluated = opt.consensus_model()  # collective over the workers, outside the counts
    opt.finish()
    accuracy = data.evaluate(evaluated, dataset)[0] if index == 0 else None
    return {**out, "role": "worker", "seconds": seconds, "clock": clock, "bytes": sent,
            "steps": steps, "compute_per_step": compute / steps, "local_per_step": local / steps,
            "opt_step_wall": in_step / steps, "slowdown": slow,
            "cpu_per_step": [compute_cpu / steps, local_cpu / steps, outside_cpu / steps],
            "accuracy": accuracy}


def warm_up(setup: Setup, dataset: data.Dataset) -> None:
    """Untimed passes first: a process's first passes are several times slower, which the first
    algorithm measured paid (on a slow host 3x over: allreduce 3.6x DDP, 1.05x warmed up)."""
    model = wide_mlp(setup.width, dataset.input_shape, dataset.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = data.batches(dataset, 0, 1, setup.batch_size, setup.seed, "shard")
    for _ in range(5):
        x, y = next(batches)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def run_ddp(setup: Setup, dataset: data.Dataset, sleep: float = 0.0) -> dict[str, Any]:
    """This rank's DDP run: the same model, batches and SGD as `allreduce` (lr 0.05). `sleep`:
    seconds a slow host's rank sleeps after each backward pass (DDP overlaps the backward pass
    with its all-reduce, so its compute cannot be timed apart: the caller passes what the
    algorithms' ranks slept)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(setup.seed)
    model = DistributedDataParallel(wide_mlp(setup.width, dataset.input_shape,
                                             dataset.num_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=setup.momentum)
    batches = data.batches(dataset, rank, world, setup.batch_size, setup.seed, "shard")
    steps = steps_for(setup, world)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        F.cross_entropy(model(x), y).backward()
        time.sleep(sleep)
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    accuracy = data.evaluate(model.module, dataset)[0] if rank == 0 else None
    # gloo's ring all-reduce: each rank sends 2(n-1)/n of the gradients per step.
    return {"rank": rank, "spec": "ddp", "workers": world, "role": "worker",
            "seconds": seconds, "bytes": int(steps * 2 * (world - 1) / world * size),
            "steps": steps, "accuracy": accuracy}


# ----------------------------------------------------------------- under torchrun
def worker_main(setup: Setup, specs: list[str], out: Path) -> None:
    """One torchrun process: every algorithm in turn, then DDP; rank 0 writes the records."""
    import torch.distributed as dist

    from distsgd.comm.torch import TorchComm, group

    torch.set_num_threads(1)
    dataset = data.load(setup.dataset)
    first = group.from_torchrun_env(timeout=setup.timeout)
    assert first is not None, "run under torchrun"
    nodes, records, load = first.nodes, [], os.getloadavg()[0]
    # Probes: inside machine 0 (rank 0 and the next rank there, if any) and across (the first
    # rank of another machine), small and model-sized.
    cross = next(r for r in range(len(nodes)) if nodes[r] != nodes[0])
    inside = next((r for r in range(1, len(nodes)) if nodes[r] == nodes[0]), None)
    model_bytes = 4 * sum(p.numel() for p in wide_mlp(setup.width, dataset.input_shape,
                                                      dataset.num_classes).parameters())
    with first.uncounted():
        pairs = [(0, inside)] if inside is not None else []
        probes = probe(first, [*pairs, (0, cross)], [4096, model_bytes])
        probes["transfer_cpu"] = transfer_cpu_probe(first, 0, cross, model_bytes)
    warm_up(setup, dataset)
    samples: dict[str, int | None] = {}  # per algorithm, decided on its first run (`longer`)
    for repeat in range(setup.repeats):
        for i, spec in enumerate(specs):
            comm = first if i == 0 and repeat == 0 else TorchComm(setup.timeout)
            comm.nodes = nodes
            dist.barrier()
            record = run_algorithm(comm, setup, spec, dataset, samples=samples.get(spec))
            if spec not in samples:  # too short a run is rerun on more samples, and not kept
                wall = torch.tensor([record.get("seconds", 0.0)])
                dist.all_reduce(wall, op=dist.ReduceOp.MAX)
                samples[spec] = longer(setup, float(wall[0]))
                if samples[spec] is not None:
                    comm.close()
                    comm = TorchComm(setup.timeout)
                    comm.nodes = nodes
                    dist.barrier()
                    record = run_algorithm(comm, setup, spec, dataset, samples=samples[spec])
            comm.close()
            records.append({**record, "node": nodes[comm.rank], "repeat": repeat})
        slept = [(r["slowdown"] - 1) * r["compute_per_step"] for r in records
                 if r.get("slowdown", 1.0) > 1.0 and r["repeat"] == repeat]
        records.append({**run_ddp(setup, dataset, statistics.median(slept) if slept else 0.0),
                        "node": nodes[dist.get_rank()], "repeat": repeat})
    if dist.get_rank() == 0:
        records.append({"spec": "probe", "role": "probe", "rank": 0, "cross": cross,
                        "inside": inside, "model_bytes": model_bytes,
                        "cores": len(os.sched_getaffinity(0)),
                        "load": [load, os.getloadavg()[0]], **probes})
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    if dist.get_rank() == 0:
        out.write_text(json.dumps([r for rank in everyone for r in rank]))
    dist.barrier()
    dist.destroy_process_group()


def measure(setup: Setup, specs: list[str], rate_bits: float) -> list[dict[str, Any]]:
    """Every algorithm and DDP on `setup.hosts` hosts whose links are shaped to `rate_bits`;
    the records. `netns.Hosts` deletes the namespaces (and kills what runs in them) on every
    way out: an error, Ctrl-C, SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="distsgd-network-") as folder, \
            netns.Hosts(setup.hosts, rate=rate_bits) as hosts:
        out = Path(folder, "records.json")
        args = ["--worker", json.dumps(asdict(setup)), "--algorithms", ",".join(specs),
                "--out", str(out)]
        done = netns.torchrun(hosts, args, setup.per_host, timeout=3000.0,
                              module="benchmarks.network",
                              env={"OMP_NUM_THREADS": "1"})
        for i, d in enumerate(done):
            if d.returncode != 0:
                raise RuntimeError(f"host {i}: torchrun failed:\n{d.stdout[-3000:]}")
        records: list[dict[str, Any]] = json.loads(out.read_text())
        return records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="100,1000", help="link rates in Mbit/s, comma-separated")
    p.add_argument("--algorithms", default=DEFAULT_ALGORITHMS,
                   help="comma-separated; name or name:key=value;key=value")
    p.add_argument("--width", type=int, default=Setup.width)
    p.add_argument("--samples", type=int, default=Setup.samples)
    p.add_argument("--min-seconds", type=float, default=Setup.min_seconds,
                   help="an algorithm faster than this on --samples runs on more samples")
    p.add_argument("--batch-size", type=int, default=Setup.batch_size)
    p.add_argument("--repeats", type=int, default=Setup.repeats)
    p.add_argument("--hosts", type=int, default=Setup.hosts, help="machines (namespaces), ≥ 2")
    p.add_argument("--per-host", type=int, default=Setup.per_host, help="processes per machine")
    p.add_argument("--slow-host", metavar="H:FACTOR",
                   help="torchrun node H's steps take FACTOR× as long (e.g. 1:3)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the simulator's prediction")
    p.add_argument("--json", help="write every record and summary to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # set by the driver, under torchrun
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    specs = [s for s in args.algorithms.split(",") if s]
    if args.worker is not None:
        worker_main(Setup.load(json.loads(args.worker)), specs, Path(args.out))
        return
    try:
        for spec in specs:
            parse_spec(spec)
        for rate in args.rates.split(","):
            if not float(rate) > 0:
                raise ValueError(rate)
    except UsageError as e:
        p.error(str(e))  # exit status 2
    except ValueError:
        p.error(f"--rates {args.rates!r}: give positive numbers of Mbit/s, e.g. 100,1000")
    if not 2 <= args.hosts <= 250:
        p.error(f"--hosts {args.hosts}: valid values lie in [2, 250]")
    if not 1 <= args.per_host <= 64:
        p.error(f"--per-host {args.per_host}: valid values lie in [1, 64]")
    slow = parse_slow_host(p, args.slow_host, args.hosts)
    reason = netns.unavailable()
    if reason is not None:
        sys.exit(f"benchmarks.network: cannot create network namespaces: {reason}")
    setup = Setup(width=args.width, samples=args.samples, min_seconds=args.min_seconds,
                  batch_size=args.batch_size,
                  repeats=args.repeats, hosts=args.hosts, per_host=args.per_host,
                  slow_host=slow)
    params = sum(p.numel() for p in wide_mlp(setup.width, (8, 8), 10).parameters())
    print(f"wide MLP width {setup.width} ({params:,} parameters, {params * 4 / 1e6:.2f} MB), "
          f"{setup.dataset}, ≥ {setup.samples} samples and ≥ {setup.min_seconds:g} s per "
          f"algorithm, batch {setup.batch_size}, "
          f"{layout(setup)}: {setup.hosts * setup.per_host} processes sharing "
          f"{len(os.sched_getaffinity(0))} CPU cores (load average {os.getloadavg()[0]:.1f})")
    results = []
    for mbit in (float(r) for r in args.rates.split(",")):
        started = time.perf_counter()
        records = measure(setup, specs, mbit * 1e6)
        rows = summarize(records, setup)
        print_table(rows, mbit * 1e6, setup)
        print(f"(measured in {time.perf_counter() - started:.0f} s including start-up)")
        entry: dict[str, Any] = {"rate_bits": mbit * 1e6, "records": records, "rows": rows,
                                 "probes": probes(records)}
        if not args.no_calibrate:
            from benchmarks.calibrate import breakdown, report

            breakdown(records, mbit * 1e6)
            entry["predicted"] = report(setup, rows, mbit * 1e6, entry["probes"])
        results.append(entry)
        if args.json:  # after every rate: a later failure keeps what was measured
            Path(args.json).write_text(json.dumps({"setup": asdict(setup), "results": results},
                                                  indent=1))


def parse_slow_host(p: argparse.ArgumentParser, text: str | None,
                    hosts: int) -> tuple[int, float] | None:
    """--slow-host H:FACTOR, H a torchrun node in [0, hosts) and FACTOR > 0 (exits on others)."""
    if text is None:
        return None
    head, _, tail = text.partition(":")
    try:
        node, factor = int(head), float(tail)
    except ValueError:
        node, factor = -1, math.nan
    if not (0 <= node < hosts and factor > 0 and math.isfinite(factor)):
        p.error(f"--slow-host {text!r}: give H:FACTOR with H in [0, {hosts - 1}] and FACTOR > 0, "
                "e.g. 1:3")
    return node, factor


if __name__ == "__main__":
    main()
