"""The simulator against the network benchmark: predicted against measured wall time.

For each algorithm that `benchmarks.network` measured, the simulator runs the same code
(`network.run_algorithm`) on the same topology: 4 ranks on 2 machines as torchrun placed them, a
fast path inside a machine, and the shaped rate between machines, each machine's NIC shared by its
ranks (`NetworkModel.hosts`, `host_link`). It prints the predicted wall time per 1,000 samples next
to the measured one, with the error, for four models:

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
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import network
from distsgd import data
from distsgd.comm.base import Comm
from distsgd.comm.sim import Link, NetworkModel, SimWorld

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
        return predict(setup, spec, rows[spec], rate_bits, cal, dataset) / rows[spec]["samples"]

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


def predict(setup: network.Setup, spec: str, row: dict[str, Any], rate_bits: float,
            cal: Calibration, dataset: data.Dataset, local: bool = True) -> float:
    """The simulator's wall time (virtual seconds) of one measured algorithm's run."""
    nodes = {int(r): n for r, n in row["nodes"].items()}
    hosts = tuple(nodes[r] for r in range(len(nodes)))
    # With local work: the optimizer step's and the rest of the loop's (the next batch), both
    # measured per rank; without: the forward/backward pass only.
    compute = {int(r): (c[0], c[1], *c[2:]) if local else (c[0], 0.0)
               for r, c in row["compute_per_step"].items()}
    world = SimWorld(len(hosts), network_model(rate_bits, hosts, cal))

    def body(comm: Comm) -> dict[str, Any]:
        return network.run_algorithm(comm, setup, spec, dataset, charge=compute.get(comm.rank))

    return max(r["clock"] for r in world.run(body) if r["role"] == "worker")


def report(setup: network.Setup, rows: dict[str, dict[str, Any]], rate_bits: float,
           found: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Print measured against predicted for every algorithm of `rows`, by four models of
    increasing detail (see the module docstring); return the figures."""
    dataset = data.load(setup.dataset)
    rendezvous = Calibration(rendezvous=True)
    fitted, fitted_on = fit(setup, rows, rate_bits, dataset, rendezvous)
    models = {"textbook": (Calibration(), False), "+local work": (Calibration(), True),
              "+rendezvous": (rendezvous, True), "+fitted": (fitted, True)}
    print(f"\n## simulator vs measured, {rate_bits / 1e6:g} Mbit/s\n")
    print(f"- textbook: inside a machine {fitted.intra_latency * 1e6:.0f} µs, "
          f"{fitted.intra_bandwidth / 1e6:.0f} MB/s; between machines "
          f"{fitted.cross_latency * 1e6:.0f} µs, {rate_bits / 8e6:.2f} MB/s; compute = the "
          "measured forward/backward time")
    print("- +local work: plus each rank's measured local work in opt.step and the rest of its "
          "loop")
    print(f"- +rendezvous: plus point-to-point as a rendezvous, one receive at a time per rank, "
          f"control messages behind up to {rendezvous.host_queue * 1e3:.0f} ms of queue")
    print(f"- +fitted: plus efficiency {fitted.efficiency:.2f} and {fitted.overhead * 1e3:.2f} ms "
          f"per message or collective, fitted on {' and '.join(fitted_on)}")
    if found is not None:
        size, cross = found["model_bytes"], found["cross"]
        ring = network_model(rate_bits, (0, 0, 1, 1), Calibration()).allreduce_time(
            size, 4, (0, 1, 2, 3))
        wire = size / (rate_bits / 8)
        print(f"- probes (idle links, 20 ms apart): {size / 1e6:.2f} MB across machines + 8 B "
              f"back {found[f'0-{cross}-{size}'] * 1e3:.1f} ms (wire {wire * 1e3:.1f} ms); "
              f"all-reduce of it {found[f'allreduce-{size}'] * 1e3:.1f} ms (ring model "
              f"{ring * 1e3:.1f} ms); 4 KB round trip in a machine {found['0-1-4096'] * 1e3:.1f} "
              f"ms, across {found[f'0-{cross}-4096'] * 1e3:.1f} ms")
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
        for name, (cal, local) in models.items():
            seconds = predict(setup, spec, row, rate_bits, cal, dataset, local)
            predicted = seconds / row["samples"] * 1000
            error = predicted / row["s_per_1000"] - 1
            out[spec] |= {name: predicted, f"{name}_error": error}
            if cal.efficiency != 1.0 or cal.overhead:
                if spec in fitted_on:  # matched by construction: not evidence
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
            return statistics.median(r[key] for r in mine) * 1e3

        step = statistics.median(r["seconds"] / r["steps"] for r in mine) * 1e3
        fb, local, wall = ms("compute_per_step"), ms("local_per_step"), ms("opt_step_wall")
        print(f"| {spec} | {step:.1f} | {fb:.1f} | {local:.1f} | {wall:.1f} | "
              f"{wall - local:.1f} | {max(0.0, step - fb - wall):.1f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="the JSON file of `benchmarks.network --json`")
    args = p.parse_args(argv)
    saved = json.loads(Path(args.results).read_text())
    setup = network.Setup(**saved["setup"])
    for entry in saved["results"]:  # summarized anew: older files lack the loop's own time
        rows = network.summarize(entry["records"], setup) if "records" in entry else entry["rows"]
        if "records" in entry:
            breakdown(entry["records"], entry["rate_bits"])
        report(setup, rows, entry["rate_bits"], entry.get("probes"))


if __name__ == "__main__":
    main()
