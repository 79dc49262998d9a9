"""The simulator against the network benchmark: predicted against measured wall time.

For each algorithm that `benchmarks.network` measured, the simulator runs the same code
(`network.run_algorithm`) on the same topology: the ranks on their machines as torchrun placed
them, a fast path inside a machine, and the shaped rate between machines, each machine's NIC shared
by its ranks (`NetworkModel.hosts`, `host_link`). It prints the predicted wall time per 1,000
samples next to the measured one, with the error, for five models:

- **default**: what `distsgd train --backend sim` gives, nothing fitted: its default network
  (25 µs, 10 GbE inside a machine) with the run's machines and shaped rate between them, no
  per-message overhead, no rendezvous; each rank's measured CPU time per step (forward/backward,
  the local work in `opt.step`, the rest of the loop: what the step costs on a core of its own),
  stretched by the cores the run shared (`cpu_share`: N processes on C cores take max(1, N/C)×
  as long) and by the slow host's factor; moving a byte costs `compute.TRANSFER_CPU` of CPU ×
  the same share, free while the rank waits for the network, else before its next computation
  (`NetworkModel.cpu_per_byte`; the run's probe `transfer_cpu` is printed next to it). Stored
  as `predicted[spec].default_error`;
- default, seen share: the same, each rank's compute stretched by the share of a core it saw
  (its forward/backward wall time over its CPU time), which counts other jobs on the machine;
- textbook: the shaped rate, textbook latencies, and each rank's measured forward/backward time
  per step (what ``--compute-time measured`` charges);
- +local work: each rank's measured local work inside ``opt.step`` charged too (copies, mixing,
  the optimizer; CPU time, stretched by the contention the forward/backward pass saw), and the
  rest of its loop (the next batch; wall time);
- +rendezvous: point-to-point between machines as gloo moves it (`NetworkModel.rendezvous`):
  header, one receive at a time per rank, a "ready" back, control messages behind the shaper's
  queue (benchmarks/p2p_costs.py measures each of these). Nothing fitted;
- +fitted: on top of +rendezvous, the share of the rate that training traffic gets (and a
  per-message overhead) fitted to `allreduce` (and `sgp`); the other algorithms test it.

    .venv/bin/python -m benchmarks.calibrate results.json     # from `network.py --json`

`network.py` calls `report` after each rate unless given --no-calibrate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks import network
from benchmarks.network_report import layout, summarize
from distsgd import data
from distsgd.comm.base import Comm
from distsgd.comm.sim import Link, NetworkModel, SimWorld
from distsgd.comm.sim.compute import TRANSFER_CPU, cpu_share, transfer_cpu
from distsgd.config import RunConfig

TARGET = 0.25  # |predicted / measured − 1|
FITTED = ("allreduce", "sgp")  # the algorithms `fit` matches; the others validate the model


@dataclass(frozen=True)
class Calibration:
    """The parts of the network model that the shaped rate does not give."""

    intra_latency: float = 50e-6  # s, loopback inside one machine
    intra_bandwidth: float = 1.5e9  # B/s, loopback TCP measured on the benchmark machine
    cross_latency: float = 100e-6  # s, veth + tbf between machines
    cross_bandwidth: float | None = None  # B/s between machines; None: the shaped rate
    overhead: float = 0.0  # s per message or collective handed to the transport
    efficiency: float = 1.0  # the share of the shaped rate that training traffic gets
    # Point-to-point as gloo's rendezvous, one receive at a time per rank, control messages
    # queued behind the reverse direction's shaper queue (NetworkModel.rendezvous, host_queue).
    rendezvous: bool = False
    host_queue: float = 0.05  # s: tbf `latency 50ms` of distsgd.netns


def fit(setup: network.Setup, rows: dict[str, dict[str, Any]], rate_bits: float,
        dataset: data.Dataset, base: Calibration) -> tuple[Calibration, tuple[str, ...]]:
    """Two parameters fitted to two algorithms (`FITTED`), so that the other ten test the model.

    `efficiency` (the share of the shaped rate that training traffic gets) and `overhead` (per
    message and per collective) enter a prediction about linearly: time ≈ a + b / efficiency +
    c · overhead. Three simulations per fitted algorithm give a, b, c; the two equations then
    give both parameters (overhead ≥ 0 and efficiency in [0.05, 1]: outside, the overhead is
    dropped and the efficiency fitted on allreduce alone).
    """
    def time_of(spec: str, cal: Calibration) -> float:
        samples: int = rows[spec]["samples"]
        return predict(setup, spec, rows[spec], rate_bits, cal, dataset) / samples

    if FITTED[0] not in rows:
        return base, ()
    eqs = []
    for spec in [s for s in FITTED if s in rows]:
        at_base = time_of(spec, base)
        b = time_of(spec, replace(base, efficiency=0.5)) - at_base
        c = (time_of(spec, replace(base, overhead=1e-3)) - at_base) / 1e-3
        eqs.append((at_base - b, b, c, rows[spec]["s_per_1000"] / 1000))
    (a1, b1, c1, t1), (a2, b2, c2, t2) = eqs if len(eqs) == 2 else eqs * 2
    det = b1 * c2 - b2 * c1
    if det != 0 and len(eqs) == 2:
        u = ((t1 - a1) * c2 - (t2 - a2) * c1) / det  # u = 1 / efficiency
        o = (b1 * (t2 - a2) - b2 * (t1 - a1)) / det
        if o >= 0 and 1.0 <= u <= 20.0:
            return replace(base, efficiency=1 / u, overhead=o), FITTED
    u = (t1 - a1) / b1 if b1 > 0 else 1.0
    return replace(base, efficiency=1 / min(max(u, 1.0), 20.0)), FITTED[:1]


def network_model(rate_bits: float, hosts: tuple[int, ...], cal: Calibration) -> NetworkModel:
    return NetworkModel(latency=cal.intra_latency, bandwidth=cal.intra_bandwidth,
                        overhead=cal.overhead, hosts=hosts, rendezvous=cal.rendezvous,
                        host_queue=cal.host_queue,
                        host_link=Link(cal.cross_latency,
                                       (cal.cross_bandwidth or rate_bits / 8) * cal.efficiency))


def hosts_of(row: dict[str, Any]) -> tuple[int, ...]:
    """Each rank's machine (torchrun node), rank order."""
    nodes = {int(r): n for r, n in row["nodes"].items()}
    return tuple(nodes[r] for r in range(len(nodes)))


def predict(setup: network.Setup, spec: str, row: dict[str, Any], rate_bits: float,
            cal: Calibration, dataset: data.Dataset, local: bool = True) -> float:
    """The simulator's wall time (virtual seconds) of one measured algorithm's run."""
    hosts = hosts_of(row)
    # With local work: the optimizer step's and the rest of the loop's (the next batch), both
    # measured per rank; without: the forward/backward pass only. A slow host's rank is
    # charged its factor on the forward/backward pass (measured before it slept).
    slow = {int(r): f for r, f in row.get("slowdown", {}).items()}
    compute = {int(r): (c[0] * slow.get(int(r), 1.0), c[1], *c[2:]) if local
               else (c[0] * slow.get(int(r), 1.0), 0.0)
               for r, c in row["compute_per_step"].items()}
    return simulate(setup, spec, network_model(rate_bits, hosts, cal), compute, dataset,
                    row["samples"])


def default_network(rate_bits: float, hosts: tuple[int, ...],
                    cores: int | None = None) -> NetworkModel:
    """`distsgd train --backend sim`'s network (RunConfig's latency and bandwidth) with the run's
    machines joined at the shaped rate, and with `cores` given, the CPU that moving bytes costs
    processes sharing them (`transfer_cpu`'s default, as ``--cores`` gives): nothing fitted."""
    return NetworkModel(latency=RunConfig.latency, bandwidth=RunConfig.bandwidth, hosts=hosts,
                        host_link=Link(RunConfig.latency, rate_bits / 8),
                        cpu_per_byte=transfer_cpu(len(hosts), cores or 0))


def predict_default(setup: network.Setup, spec: str, row: dict[str, Any], rate_bits: float,
                    cores: int | None, dataset: data.Dataset) -> float:
    """The default model's wall time (see the module docstring): CPU time × the cores' share ×
    the slow host's factor (on the forward/backward pass only, as `--straggler` does). With
    `cores` None, the share each rank saw instead (its forward/backward pass's wall time over
    its CPU time: the machine's whole load, other jobs' too). NaN for records of older runs,
    which lack the CPU times."""
    if not row.get("cpu_per_step"):
        return math.nan
    hosts = hosts_of(row)
    slow = {int(r): f for r, f in row.get("slowdown", {}).items()}
    compute: dict[int, tuple[float, ...]] = {}
    for r, c in row["cpu_per_step"].items():
        share = (cpu_share(len(hosts), cores) if cores is not None
                 else max(1.0, row["compute_per_step"][r][0] / max(c[0], 1e-9)))
        compute[int(r)] = (c[0] * share * slow.get(int(r), 1.0), c[1] * share, c[2] * share)
    return simulate(setup, spec, default_network(rate_bits, hosts, cores), compute, dataset,
                    row["samples"])


def simulate(setup: network.Setup, spec: str, net: NetworkModel,
             compute: dict[int, tuple[float, ...]], dataset: data.Dataset,
             samples: int | None = None) -> float:
    """The virtual wall time of `spec`'s run of `samples` (all workers'; None: the setup's) on
    `net`, each rank charged `compute[rank]`."""
    world = SimWorld(len(net.hosts), net)

    def body(comm: Comm) -> dict[str, Any]:
        return network.run_algorithm(comm, setup, spec, dataset, charge=compute.get(comm.rank),
                                     samples=samples)

    return max(float(r["clock"]) for r in world.run(body) if r["role"] == "worker")


def report(setup: network.Setup, rows: dict[str, dict[str, Any]], rate_bits: float,
           found: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Print measured against predicted for every algorithm of `rows`: the default model, then
    four of increasing detail (see the module docstring); return the figures."""
    # One thread, as each measured process had: intra-op threads on a loaded machine spin.
    torch.set_num_threads(1)
    dataset = data.load(setup.dataset)
    cores = (found or {}).get("cores") or len(os.sched_getaffinity(0))
    rendezvous = Calibration(rendezvous=True)
    fitted, fitted_on = fit(setup, rows, rate_bits, dataset, rendezvous)
    models: dict[str, Callable[[str, dict[str, Any]], float]] = {
        "default": lambda spec, row: predict_default(setup, spec, row, rate_bits, cores, dataset),
        "default, seen share": lambda spec, row: predict_default(setup, spec, row, rate_bits,
                                                                 None, dataset)}
    for name, cal, local in (("textbook", Calibration(), False),
                             ("+local work", Calibration(), True),
                             ("+rendezvous", rendezvous, True), ("+fitted", fitted, True)):
        models[name] = partial(_predict_with, setup, rate_bits, cal, dataset, local)
    _describe(setup, rows, rate_bits, cores, fitted, fitted_on, found)
    print("\n| algorithm | measured s / 1k | " + " | ".join(
        f"{n} s / 1k | error" for n in models) + " |")
    print("|---|---:|" + "---:|---:|" * len(models))
    out: dict[str, dict[str, float]] = {}
    errors: dict[str, list[float]] = {n: [] for n in models}
    for spec, row in rows.items():
        if spec == "ddp":
            continue  # not a distsgd algorithm: the simulator cannot run it
        out[spec] = {"measured": row["s_per_1000"]}
        cells = []
        for name, model in models.items():
            predicted = model(spec, row) / row["samples"] * 1000
            error = predicted / row["s_per_1000"] - 1
            out[spec] |= {name: predicted, f"{name}_error": error}
            if math.isnan(error):
                cells.append("– | –")
                continue
            if name == "+fitted" and spec in fitted_on:  # matched by construction: not evidence
                cells.append(f"{predicted:.3f} | (fitted)")
                continue
            errors[name].append(abs(error))
            cells.append(f"{predicted:.3f} | {error:+.0%}{'' if abs(error) <= TARGET else ' ✗'}")
        print(f"| {spec} | {row['s_per_1000']:.3f} | " + " | ".join(cells) + " |")
    for name, errs in errors.items():
        if errs:
            print(f"\n{name}: mean |error| {sum(errs) / len(errs):.0%}, worst {max(errs):.0%}, "
                  f"{sum(e <= TARGET for e in errs)}/{len(errs)} within ±{TARGET:.0%}")
    return out


def _predict_with(setup: network.Setup, rate_bits: float, cal: Calibration,
                  dataset: data.Dataset, local: bool, spec: str, row: dict[str, Any]) -> float:
    return predict(setup, spec, row, rate_bits, cal, dataset, local)


def _describe(setup: network.Setup, rows: dict[str, dict[str, Any]], rate_bits: float,
              cores: int, fitted: Calibration, fitted_on: tuple[str, ...],
              found: dict[str, Any] | None) -> None:
    """The models' parameters, and the probes of the links next to what the model says."""
    hosts = hosts_of(next(iter(rows.values())))
    print(f"\n## simulator vs measured, {rate_bits / 1e6:g} Mbit/s, {layout(setup)}\n")
    print(f"- default: `distsgd train --backend sim`'s network ({RunConfig.latency * 1e6:.0f} µs, "
          f"{RunConfig.bandwidth / 1e6:.0f} MB/s inside a machine), {rate_bits / 8e6:.2f} MB/s "
          f"between machines; compute = measured CPU time × {cpu_share(len(hosts), cores):g} "
          f"({len(hosts)} processes on {cores} cores); moving a byte costs "
          f"{TRANSFER_CPU * 1e9:.2f} ns of CPU × {cpu_share(len(hosts), cores):g}, spent while "
          "waiting for the network, else before the next computation; nothing fitted")
    print("- default, seen share: the same with each rank's observed share of a core (its "
          "forward/backward wall time / CPU time: other jobs' load too) instead of N/C")
    print(f"- textbook: inside a machine {fitted.intra_latency * 1e6:.0f} µs, "
          f"{fitted.intra_bandwidth / 1e6:.0f} MB/s; between machines "
          f"{fitted.cross_latency * 1e6:.0f} µs, {rate_bits / 8e6:.2f} MB/s; compute = the "
          "measured forward/backward time")
    print("- +local work: plus each rank's measured local work in opt.step and the rest of its "
          "loop")
    print("- +rendezvous: plus point-to-point as a rendezvous, one receive at a time per rank, "
          f"control messages behind up to {fitted.host_queue * 1e3:.0f} ms of queue")
    print(f"- +fitted: plus efficiency {fitted.efficiency:.2f} and {fitted.overhead * 1e3:.2f} ms "
          f"per message or collective, fitted on {' and '.join(fitted_on)}")
    if found is None:
        return
    size, cross, inside = found["model_bytes"], found["cross"], found.get("inside", 1)
    ring = default_network(rate_bits, hosts).allreduce_time(size, len(hosts),
                                                            tuple(range(len(hosts))))
    wire = size / (rate_bits / 8)
    within = (f"4 KB round trip in a machine {found[f'0-{inside}-4096'] * 1e3:.1f} ms, "
              if inside is not None else "4 KB round trip ")
    print(f"- probes (idle links, 20 ms apart): {size / 1e6:.2f} MB across machines + 8 B "
          f"back {found[f'0-{cross}-{size}'] * 1e3:.1f} ms (wire {wire * 1e3:.1f} ms); "
          f"all-reduce of it {found[f'allreduce-{size}'] * 1e3:.1f} ms (ring model "
          f"{ring * 1e3:.1f} ms); {within}across {found[f'0-{cross}-4096'] * 1e3:.1f} ms; load "
          f"average {', '.join(f'{x:.1f}' for x in found.get('load', []))}"
          + (f"; moving a byte costs {found['transfer_cpu'] * 1e9:.2f} ns of CPU (the model: "
             f"{TRANSFER_CPU * 1e9:.2f})" if "transfer_cpu" in found else ""))


def breakdown(records: list[dict[str, Any]], rate_bits: float) -> None:
    """Where a worker's step goes, measured (ms, median over workers and repeats): the
    forward/backward pass, local work in opt.step (CPU, stretched), opt.step's wall time (the rest
    of it is waiting for the network), and the rest of the loop (the next batch)."""
    print(f"\n## where a step goes, {rate_bits / 1e6:g} Mbit/s (ms per worker step)\n")
    print("| algorithm | step | forward/backward | local work | opt.step wall | waiting | "
          "rest of loop |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    workers = [r for r in records if r.get("role") == "worker" and "opt_step_wall" in r]
    for spec in dict.fromkeys(r["spec"] for r in workers):
        mine = [r for r in workers if r["spec"] == spec]

        def ms(key: str, mine: list[dict[str, Any]] = mine) -> float:
            return float(statistics.median(r[key] for r in mine)) * 1e3

        step = statistics.median(r["seconds"] / r["steps"] for r in mine) * 1e3
        fb, local, wall = ms("compute_per_step"), ms("local_per_step"), ms("opt_step_wall")
        print(f"| {spec} | {step:.1f} | {fb:.1f} | {local:.1f} | {wall:.1f} | "
              f"{wall - local:.1f} | {max(0.0, step - fb - wall):.1f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="the JSON file of `benchmarks.network --json`")
    args = p.parse_args(argv)
    saved = json.loads(Path(args.results).read_text())
    setup = network.Setup.load(saved["setup"])
    for entry in saved["results"]:  # summarized anew: older files lack the loop's own time
        rows = summarize(entry["records"], setup) if "records" in entry else entry["rows"]
        if "records" in entry:
            breakdown(entry["records"], entry["rate_bits"])
        report(setup, rows, entry["rate_bits"], entry.get("probes"))


if __name__ == "__main__":
    main()
