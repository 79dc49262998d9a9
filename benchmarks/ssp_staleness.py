"""SSP's staleness bound s: throughput against per-step quality, under a straggler and jitter.

N simulated workers train on digits with SSP for each s in {0, 1, 3, 10, inf}; one worker (3) is
4× slower and every step of every worker is slowed by a lognormal factor (σ = 0.3). The table gives
the throughput (samples per second of virtual time, over the whole run), the final accuracy, the
staleness of the pushes (server versions between a worker's pull and its push, so s = 0 still shows
up to N − 1: the N pushes of one clock are applied one after another), the largest clock gap the
server saw when it answered a pull, a check that this gap never exceeded s, and the virtual time to
the target accuracy.

    .venv/bin/python -m benchmarks.ssp_staleness
    .venv/bin/python -m benchmarks.ssp_staleness --staleness 0,2,inf --slowdown none

The exit status is 1 if any run's clock gap exceeds its bound (that is SSP's invariant, not a
performance figure); the other figures are printed, never judged.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.stragglers import (
    Outcome,
    add_common_flags,
    check_common_flags,
    fmt_ratio,
    fmt_staleness,
    fmt_time,
    run_one,
    table,
)


def parse_bounds(text: str) -> list[float]:
    """Whole numbers >= 0 or inf; SSP itself rejects the rest, but only once its run starts."""
    bounds = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            s = float(item)
        except ValueError:
            s = -1.0
        if not (s >= 0 and (math.isinf(s) or s == int(s))):
            raise argparse.ArgumentTypeError(
                f"--staleness {item!r}: expected whole numbers >= 0 or inf")
        bounds.append(s)
    if not bounds:
        raise argparse.ArgumentTypeError("--staleness: give at least one bound")
    return bounds


def fmt_bound(s: float) -> str:
    return "inf" if math.isinf(s) else str(int(s))


def gap_check(o: Outcome, s: float) -> str:
    if o.max_clock_gap is None:
        return "missing"  # SSP always reports it; its absence is a failure of its own
    if math.isinf(s):
        return "ok (no bound)"
    return "ok" if o.max_clock_gap <= s else "VIOLATED"


def ssp_table(rows: Sequence[tuple[float, Outcome]], target: float) -> str:
    synchronous = next((o for s, o in rows if s == 0), None)
    reference = synchronous.samples_per_s if synchronous is not None else None
    headers = ["s", "samples/s", "×(s=0)", "final acc", "staleness mean/max", "max clock gap",
               "gap ≤ s", f"t→{target:g} (s)", "step"]
    body = [[fmt_bound(s), f"{o.samples_per_s:,.0f}" if o.samples_per_s else "-",
             fmt_ratio(o.samples_per_s, reference), f"{o.final_accuracy:.3f}", fmt_staleness(o),
             "-" if o.max_clock_gap is None else f"{o.max_clock_gap:g}", gap_check(o, s),
             fmt_time(o.target_time_s), "-" if o.target_step is None else str(o.target_step)]
            for s, o in rows]
    return table(headers, body)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, steps=300)
    parser.add_argument("--staleness", type=parse_bounds, default=[0.0, 1.0, 3.0, 10.0, math.inf],
                        help="comma list of bounds s (whole numbers or inf; default "
                             "0,1,3,10,inf)")
    parser.add_argument("--slowdown", default="lognormal:0.3",
                        help="random per-step slowdown of every worker (none | lognormal:SIGMA)")
    args = parser.parse_args(argv)
    check_common_flags(parser, args)
    rank, factor = args.straggler
    options: dict[str, Any] = {
        "algorithm": "ssp", "workers": args.workers, "dataset": "digits", "steps": args.steps,
        "eval_every": args.eval_every, "seed": args.seed, "stragglers": ((rank, factor),),
        "slowdown": args.slowdown}
    root = Path(tempfile.mkdtemp(prefix="distsgd-ssp-"))
    started = time.perf_counter()
    rows: list[tuple[float, Outcome]] = []
    try:
        print(f"ssp, {args.workers} simulated workers, digits, {args.steps} steps each (a shared "
              f"budget of {args.workers * args.steps}), worker {rank} {factor:g}× slower, "
              f"slowdown {args.slowdown}, seed {args.seed}; target test accuracy {args.target:g}")
        for s in args.staleness:
            o = run_one(f"ssp-s{fmt_bound(s)}", root, args.target, hyperparameters={"s": s},
                        **options)
            print(f"  s={fmt_bound(s)} done in {o.wall_s:.1f} s", file=sys.stderr, flush=True)
            rows.append((s, o))
        print()
        print(ssp_table(rows, args.target))
        # The table is pasted into notes without this docstring: say what the columns count.
        print("\nsamples/s: over the whole run, in virtual time; staleness: server versions "
              "between a worker's pull and its push (s = 0 still shows up to workers − 1); "
              "max clock gap: pulling worker's clock − slowest clock, when the pull was answered")
        missed = [fmt_bound(s) for s, o in rows if o.target_time_s is None]
        if missed:
            print(f"\nnot reached within {args.steps} steps: s = {', '.join(missed)}")
        print(f"\nwall clock: {time.perf_counter() - started:.0f} s")
    finally:
        if args.keep_runs:
            print(f"run folders: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    violated = [s for s, o in rows if gap_check(o, s) in ("VIOLATED", "missing")]
    if violated:
        print(f"clock gap above the bound for s = {', '.join(map(fmt_bound, violated))}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
