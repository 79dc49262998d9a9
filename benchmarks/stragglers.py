"""Stragglers: virtual time to a target accuracy for every algorithm, with one slow worker.

N simulated workers train on digits; one of them (by default worker 3) computes every step 4×
slower. For each algorithm the table gives the virtual time of the first evaluation whose test
accuracy reaches the target (no interpolation: evaluations are frequent instead), its ratio to
allreduce's, the final accuracy, the bytes each worker sent and, for the parameter-server
algorithms, the staleness of the pushes. The same table without the straggler follows, then what
the straggler cost each algorithm.

    .venv/bin/python -m benchmarks.stragglers                       # 8 workers, 300 steps
    .venv/bin/python -m benchmarks.stragglers --algorithms allreduce,downpour,ssp --steps 200
    .venv/bin/python -m benchmarks.stragglers --no-straggler-baseline --straggler 0:8

How the simulator counts (see `distsgd.evaluation`): a synchronous algorithm's workers take
``--steps`` steps each, so all of them wait for the straggler; the asynchronous ones share a
budget of workers × steps steps, so a fast worker takes more than the straggler, and "step" is
global progress (steps taken in all / workers). Both read the same number of samples per step, so
the step column compares sample efficiency and the time column what the schedule buys.

Staleness is counted in server versions (updates applied between a worker's pull and its push),
not in clocks. Bytes are what the workers sent; a parameter server's replies are not included.
It prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import distsgd
from distsgd import algorithms
from distsgd.errors import UsageError

REFERENCE = "allreduce"  # the ratio column's denominator


@dataclass(frozen=True)
class Outcome:
    """What one run measured."""

    label: str
    synchronous: bool
    target_time_s: float | None  # virtual time of the first evaluation at the target; None: never
    target_step: int | None
    final_accuracy: float
    virtual_time_s: float
    samples_per_s: float | None
    bytes_per_worker: float
    staleness_mean: float | None
    staleness_max: int | None
    max_clock_gap: float | None
    wall_s: float


def first_reaching(metrics: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation whose test accuracy is at least `target` (metrics are in run order)."""
    return next((m for m in metrics if m["test_accuracy"] >= target), None)


def run_one(label: str, root: Path, target: float, **options: Any) -> Outcome:
    """One simulated run in a fresh folder under `root`, reduced to an `Outcome`."""
    started = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=root))
    result = distsgd.train(backend="sim", out=str(out), **options)
    wall = time.perf_counter() - started
    summary = result.summary
    hit = first_reaching(result.metrics, target)
    per_worker = summary["bytes_sent_per_worker"]
    return Outcome(
        label=label,
        synchronous=algorithms.get(options["algorithm"]).synchronous,
        target_time_s=None if hit is None else hit["virtual_time_s"],
        target_step=None if hit is None else hit["step"],
        # The summary's accuracy is the model after every step of the budget, which for an
        # asynchronous run includes the steps still in flight at the last evaluation mark.
        final_accuracy=summary["test_accuracy"],
        virtual_time_s=summary["virtual_time_s"],
        samples_per_s=summary.get("samples_per_s"),
        bytes_per_worker=sum(per_worker) / len(per_worker),
        staleness_mean=summary.get("staleness_mean"),
        staleness_max=summary.get("staleness_max"),
        max_clock_gap=summary.get("ssp_max_clock_gap"),
        wall_s=wall,
    )


# ------------------------------------------------------------------------------ formatting
def fmt_time(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:.4f}"


def fmt_ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference == 0:
        return "-"
    return f"{value / reference:.2f}"


def fmt_staleness(o: Outcome) -> str:
    if o.staleness_mean is None:
        return "-"
    return f"{o.staleness_mean:.2f} / {o.staleness_max}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the figures right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(headers), line(["-" * w for w in widths]),
                      *(line(r) for r in rows)])


def outcome_table(outcomes: Sequence[Outcome], target: float) -> str:
    reference = next((o.target_time_s for o in outcomes if o.label == REFERENCE), None)
    headers = ["algorithm", "mode", f"t→{target:g} (s)", "×allreduce", "step", "final acc",
               "MB/worker", "staleness mean/max"]
    rows = [[o.label, "sync" if o.synchronous else "async", fmt_time(o.target_time_s),
             fmt_ratio(o.target_time_s, reference),
             "-" if o.target_step is None else str(o.target_step), f"{o.final_accuracy:.3f}",
             f"{o.bytes_per_worker / 1e6:.1f}", fmt_staleness(o)] for o in outcomes]
    return table(headers, rows)


def cost_table(slow: Sequence[Outcome], even: Sequence[Outcome], target: float) -> str:
    """Per algorithm: time to target with and without the straggler, and their ratio."""
    baseline = {o.label: o for o in even}
    headers = ["algorithm", f"t→{target:g} even (s)", f"t→{target:g} straggler (s)",
               "straggler cost ×"]
    rows = []
    for o in slow:
        b = baseline.get(o.label)
        if b is None:
            continue
        rows.append([o.label, fmt_time(b.target_time_s), fmt_time(o.target_time_s),
                     fmt_ratio(o.target_time_s, b.target_time_s)])
    return table(headers, rows)


# ------------------------------------------------------------------------------ the command
def parse_straggler(text: str) -> tuple[int, float]:
    rank, sep, factor = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return int(rank), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--straggler {text!r}: expected RANK:FACTOR, e.g. 3:4") from None


def algorithm_list(text: str | None) -> list[str]:
    """The requested algorithms, allreduce first (it is the reference), then synchronous before
    asynchronous, each group in name order unless the user gave an order."""
    if text is None:
        names = sorted(algorithms.REGISTRY,
                       key=lambda n: (n != REFERENCE, not algorithms.get(n).synchronous, n))
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
        for name in names:
            algorithms.get(name)  # a clear error naming the valid choices
        if REFERENCE not in names:
            names.insert(0, REFERENCE)  # without it the ratio column would be empty
    return list(dict.fromkeys(names))


def add_common_flags(parser: argparse.ArgumentParser, steps: int) -> None:
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=steps,
                        help="steps per worker (asynchronous: workers × steps in all)")
    parser.add_argument("--target", type=float, default=0.90, help="test accuracy to reach")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=5,
                        help="steps between evaluations: the resolution of the time to target")
    parser.add_argument("--straggler", type=parse_straggler, default=(3, 4.0),
                        metavar="RANK:FACTOR", help="the slow worker and its slowdown (3:4)")
    parser.add_argument("--keep-runs", action="store_true",
                        help="keep the run folders (in a temporary directory) and print where")


def check_common_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone (distsgd would reject it too, but only mid-table)."""
    rank = args.straggler[0]
    if not 0 <= rank < args.workers:
        parser.error(f"--straggler rank {rank} is not a worker (0..{args.workers - 1})")
    if not 0.0 < args.target <= 1.0:
        parser.error(f"--target {args.target} is not an accuracy in (0, 1]")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, steps=300)
    parser.add_argument("--algorithms", default=None,
                        help="comma list (default: every registered one); allreduce is added "
                             "as the reference")
    parser.add_argument("--no-straggler-baseline", action="store_true",
                        help="skip the runs without the straggler")
    args = parser.parse_args(argv)
    check_common_flags(parser, args)
    try:
        names = algorithm_list(args.algorithms)
    except UsageError as e:
        parser.error(str(e))
    common: dict[str, Any] = {"workers": args.workers, "dataset": "digits", "steps": args.steps,
                              "eval_every": args.eval_every, "seed": args.seed}
    rank, factor = args.straggler
    root = Path(tempfile.mkdtemp(prefix="distsgd-stragglers-"))
    started = time.perf_counter()
    try:
        print(f"{args.workers} simulated workers, digits, {args.steps} steps, evaluation every "
              f"{args.eval_every}, seed {args.seed}; target test accuracy {args.target:g}")
        scenarios: list[tuple[str, tuple[tuple[int, float], ...]]] = [
            (f"worker {rank} is {factor:g}× slower", ((rank, factor),))]
        if not args.no_straggler_baseline:
            scenarios.append(("no straggler", ()))
        results: list[list[Outcome]] = []
        for title, stragglers in scenarios:
            outcomes = []
            for name in names:
                o = run_one(name, root, args.target, algorithm=name, stragglers=stragglers,
                            **common)
                print(f"  {title}: {name} done in {o.wall_s:.1f} s", file=sys.stderr, flush=True)
                outcomes.append(o)
            results.append(outcomes)
            print(f"\n## {title}\n")
            print(outcome_table(outcomes, args.target))
        if len(results) == 2:
            print(f"\n## what the straggler costs (time to {args.target:g} with / without)\n")
            print(cost_table(results[0], results[1], args.target))
        # The tables are pasted into notes without this docstring: say what the columns count.
        print("\nstep: evaluation at which the target was first reached (asynchronous: steps "
              "taken in all / workers); MB/worker: what the workers sent, server replies "
              "excluded; staleness: server versions between a worker's pull and its push")
        missed = sorted({o.label for group in results for o in group if o.target_time_s is None})
        if missed:
            print(f"\nnot reached within {args.steps} steps: {', '.join(missed)} "
                  "(raise --steps to see when they get there)")
        print(f"\nwall clock: {time.perf_counter() - started:.0f} s")
    finally:
        if args.keep_runs:
            print(f"run folders: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
