"""OSGP: how much of sgp's communication `overlap` hides, in the simulator (issue 11's target:
per step ≤ 1.15 × max(compute, communication), and below sgp without overlap).

Set-up where compute and communication are of the same size: N simulated workers train `mlp` on
`digits` (26,122 parameters: one push-sum share is 104.5 kB with its weight) on a network of
`--rate` Mbit/s (default 100, latency 100 µs); each step computes for a fixed time equal to what one
share takes to cross (size / bandwidth + latency, about 8.5 ms at 100 Mbit/s), unless `--compute-ms`
says otherwise. Per step, in virtual seconds (the slowest worker's clock / steps):

- **sgp**: without overlap a step costs compute plus the exchange;
- **osgp τ**: `overlap=true, synch_freq=τ`; ideally max(compute, communication);
- **allreduce**: the ring all-reduce of the same model, for scale.

    .venv/bin/python -m benchmarks.osgp_overlap
    .venv/bin/python -m benchmarks.osgp_overlap --rate 1000 --workers 16 --synch-freq 0,1,3

The simulator is deterministic: one run per row, no spread. Real processes on a shaped link:
``python -m benchmarks.network --rates 1000 --algorithms allreduce,sgp,sgp:overlap=true``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from typing import Any

import distsgd
from distsgd import data, models


def share_bytes(model: str, dataset: str) -> int:
    """Bytes of one push-sum message: the float32 parameters and the float64 weight."""
    ds = data.load(dataset)
    net = models.build(model, ds.input_shape, ds.num_classes)
    return 4 * sum(p.numel() for p in net.parameters()) + 8


def step_seconds(args: argparse.Namespace, algorithm: str, compute: float,
                 hyperparameters: dict[str, Any]) -> float:
    with tempfile.TemporaryDirectory() as out:
        result = distsgd.train(algorithm=algorithm, hyperparameters=hyperparameters,
                               workers=args.workers, dataset=args.dataset, model=args.model,
                               steps=args.steps, eval_every=args.steps, backend="sim",
                               compute_time=str(compute), bandwidth=args.rate * 1e6 / 8,
                               latency=args.latency, seed=0, out=out)
    clocks = [w.virtual_time_s for w in result.workers if w.virtual_time_s is not None]
    steps: int = args.steps
    return max(clocks) / steps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="link rate, Mbit/s")
    parser.add_argument("--latency", type=float, default=100e-6, help="one-way latency, s")
    parser.add_argument("--compute-ms", type=float, default=None,
                        help="compute per step (default: the time one share takes to cross)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--synch-freq", default="0,1,2", help="comma-separated τ values")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--dataset", default="digits")
    args = parser.parse_args(argv)
    taus = [int(t) for t in args.synch_freq.split(",") if t.strip()]

    size = share_bytes(args.model, args.dataset)
    comm = size / (args.rate * 1e6 / 8) + args.latency
    compute = comm if args.compute_ms is None else args.compute_ms / 1e3
    floor = max(compute, comm)
    print(f"{args.workers} workers, {args.model} on {args.dataset} ({size / 1e3:.1f} kB a share), "
          f"{args.rate:g} Mbit/s, latency {args.latency * 1e6:.0f} µs, {args.steps} steps")
    print(f"compute {compute * 1e3:.2f} ms/step, communication {comm * 1e3:.2f} ms/step "
          f"(one share across), max {floor * 1e3:.2f} ms\n")

    rows = [("sgp", "sgp", {}),
            *[(f"osgp τ={t}", "sgp", {"overlap": True, "synch_freq": t}) for t in taus],
            ("allreduce", "allreduce", {})]
    plain = None
    print(f"{'run':<12}{'ms/step':>10}{'× max(c, m)':>14}{'× sgp':>8}")
    for label, algorithm, hyper in rows:
        seconds = step_seconds(args, algorithm, compute, hyper)
        plain = seconds if plain is None else plain
        print(f"{label:<12}{seconds * 1e3:>10.2f}{seconds / floor:>14.3f}{seconds / plain:>8.3f}")
    print("\ntarget: osgp ≤ 1.15 × max(compute, communication), and below sgp")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
