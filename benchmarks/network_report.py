"""The network benchmark's figures: per-algorithm summaries of its records, and its table.

`benchmarks.network` measures, this module condenses (`summarize`) and prints (`print_table`);
`benchmarks.calibrate` predicts from the same summaries.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.network import Setup


def summarize(records: list[dict[str, Any]], setup: Setup) -> dict[str, dict[str, Any]]:
    """Per algorithm: wall s per 1,000 samples (median over repeats, and each), mean bytes per
    worker, accuracy (of the first repeat), per rank (medians over repeats) the compute per step
    as charged by `run_algorithm` and its CPU time (`cpu_per_step`), the slowdown, placement."""
    rows: dict[str, dict[str, Any]] = {}
    for spec in dict.fromkeys(r["spec"] for r in records if r["role"] != "probe"):
        mine = [r for r in records if r["spec"] == spec]
        workers = [r for r in mine if r["role"] == "worker"]
        repeats = sorted({r.get("repeat", 0) for r in workers})
        first = [r for r in workers if r.get("repeat", 0) == repeats[0]]
        samples = first[0]["steps"] * len(first) * setup.batch_size
        walls = [max(r["seconds"] for r in workers if r.get("repeat", 0) == k) for k in repeats]
        compute = {r["rank"]: [statistics.median(x[key] for x in workers if x["rank"] == r["rank"])
                               for key in ("compute_per_step", "local_per_step")]
                   + [statistics.median(_outside(x) for x in workers if x["rank"] == r["rank"])]
                   for r in first if r.get("compute_per_step") is not None}
        cpu = {r["rank"]: [statistics.median(x["cpu_per_step"][i] for x in workers
                                             if x["rank"] == r["rank"]) for i in range(3)]
               for r in first if r.get("cpu_per_step") is not None}
        rows[spec] = {
            "s_per_1000": statistics.median(walls) / samples * 1000,
            "each_s_per_1000": [w / samples * 1000 for w in walls], "samples": samples,
            "bytes_per_worker": statistics.mean(r["bytes"] for r in first),
            "accuracy": next(r["accuracy"] for r in first if r["accuracy"] is not None),
            "compute_per_step": compute, "cpu_per_step": cpu,
            "slowdown": {r["rank"]: r["slowdown"] for r in first if "slowdown" in r},
            "nodes": {r["rank"]: r["node"] for r in mine if r.get("repeat", 0) == repeats[0]},
        }
    return rows


def _outside(record: dict[str, Any]) -> float:
    """Seconds per step of the loop outside the forward/backward pass (with a slow host's sleep)
    and `opt.step`: the next batch, the timers (wall time; 0 for records without
    `opt_step_wall`)."""
    if record.get("opt_step_wall") is None:
        return 0.0
    step = record["seconds"] / record["steps"]
    return float(max(0.0, step - record["compute_per_step"] * record.get("slowdown", 1.0)
                     - record["opt_step_wall"]))


def probes(records: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in records if r["role"] == "probe")


def layout(setup: Setup) -> str:
    slow = (f", host {setup.slow_host[0]} {setup.slow_host[1]:g}× slower" if setup.slow_host
            else "")
    return f"{setup.hosts} hosts × {setup.per_host} processes{slow}"


def print_table(rows: dict[str, dict[str, Any]], rate_bits: float, setup: Setup) -> None:
    base, ddp = rows.get("allreduce"), rows.get("ddp")
    print(f"\n## link {rate_bits / 1e6:g} Mbit/s (tc tbf), {layout(setup)}\n")
    print("| algorithm | s / 1k samples (each run) | MB sent / worker | accuracy | × allreduce "
          "| × DDP |")
    print("|---|---:|---:|---:|---:|---:|")
    for spec, row in rows.items():
        vs_base = row["s_per_1000"] / base["s_per_1000"] if base else math.nan
        vs_ddp = row["s_per_1000"] / ddp["s_per_1000"] if ddp else math.nan
        each = ", ".join(f"{x:.2f}" for x in row["each_s_per_1000"])
        print(f"| {spec} | {row['s_per_1000']:.3f} ({each}) | "
              f"{row['bytes_per_worker'] / 1e6:.2f} | {row['accuracy']:.3f} | {vs_base:.2f} | "
              f"{vs_ddp:.2f} |")
    print_targets(rows, rate_bits, setup)


# Issue 11's targets: (hosts, per host, Mbit/s) -> the largest s / 1k samples × DDP per algorithm.
TARGETS = {(2, 2, 100.0): {"sgp": 1.05, "crossover": 1.0},
           (2, 2, 1000.0): {"sgp:overlap=true": 1.05},
           (4, 1, 100.0): {"sgp": 0.80, "crossover": 0.85}}


def print_targets(rows: dict[str, dict[str, Any]], rate_bits: float, setup: Setup) -> None:
    """Each target of this set-up that the run measured, met or not (printed, never asserted)."""
    ddp = rows.get("ddp")
    targets = TARGETS.get((setup.hosts, setup.per_host, rate_bits / 1e6), {})
    if ddp is None or setup.slow_host or not targets:
        return
    for spec, bound in targets.items():
        if spec in rows:
            ratio = rows[spec]["s_per_1000"] / ddp["s_per_1000"]
            print(f"target: {spec} ≤ {bound:.2f} × DDP: {ratio:.2f} "
                  f"{'met' if ratio <= bound else 'missed'}")
