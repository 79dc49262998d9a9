"""`distsgd train | list | compare | report`: the command line.

Bad input (an unknown name, a value out of range, missing data) ends with exit status 2 and one
line naming the problem and the valid choices; a failed run (a crashed worker, a timeout, a
deadlock in the simulator) ends with exit status 1 and a line saying what happened.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from distsgd import algorithms
from distsgd.errors import DistSGDError, UsageError

EXIT_USAGE, EXIT_FAILED = 2, 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the message already names the option and its valid values.
        raise UsageError(message)


def _train_parser(sub: Any) -> None:
    from distsgd import data, models
    from distsgd.config import BACKENDS, DIVERGENCE, ON_FAILURE, SAMPLINGS, RunConfig

    d = RunConfig()
    p = sub.add_parser("train", help="train one model with one algorithm",
                       description="Train one model on many workers with one algorithm.")
    p.add_argument("--algorithm", "-a", default=d.algorithm,
                   help=f"one of: {', '.join(sorted(algorithms.REGISTRY))} (default %(default)s)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                   help="an algorithm hyperparameter (repeatable; see `distsgd list`)")
    p.add_argument("--workers", "-n", type=int, default=d.workers, help="training workers")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="sim (simulated workers, the default), processes (one local process per "
                        "worker), torchrun (the default under torchrun)")
    p.add_argument("--dataset", default=d.dataset, help=f"one of: {', '.join(data.DATASETS)}")
    p.add_argument("--model", default=None,
                   help=f"one of: {', '.join(models.MODELS)} (default: cnn for images)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="steps per worker")
    length.add_argument("--epochs", type=float, default=None,
                        help=f"passes over the training set (default {RunConfig.DEFAULT_EPOCHS:g})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per worker")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the algorithm's, see `distsgd list`)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations (default: ten per run)")
    p.add_argument("--sampling", choices=SAMPLINGS, default=d.sampling,
                   help="shard: disjoint shards; iid: every worker samples the whole set")
    p.add_argument("--compute-time", default=d.compute_time,
                   help="simulated compute per step: flops[:RATE], measured, or seconds")
    p.add_argument("--straggler", action="append", default=[], metavar="RANK:FACTOR",
                   help="make worker RANK (0..workers-1) FACTOR times slower (repeatable)")
    p.add_argument("--slowdown", default=d.slowdown,
                   help="seeded random slowdown of every step: none | lognormal:SIGMA")
    p.add_argument("--on-divergence", choices=DIVERGENCE, default=d.on_divergence,
                   help="a non-finite loss: stop the run naming worker and step (default), or "
                        "skip that update")
    p.add_argument("--on-failure", choices=ON_FAILURE, default=d.on_failure,
                   help="a worker process dies: stop the run naming it and its last step "
                        "(default), or continue without it (gossip and parameter servers; see "
                        "docs/failures.md)")
    p.add_argument("--latency", type=float, default=d.latency, help="simulated, seconds")
    p.add_argument("--bandwidth", type=float, default=d.bandwidth, help="simulated, bytes/s")
    p.add_argument("--link", action="append", default=[], metavar="A:B:LATENCY:BANDWIDTH",
                   help="simulated: one link's latency (s) and bandwidth (bytes/s) between global "
                        "ranks A and B, both directions (repeatable)")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds a blocking operation may wait on real processes")
    p.add_argument("--device", default=d.device,
                   help="cpu (default), cuda, or cuda:N (simulator); see docs/multi-machine.md")
    p.add_argument("--out", default=None, help="run folder (default runs/<time>-<algorithm>)")
    p.add_argument("--data-dir", default=None, help="dataset cache folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="N",
                   help="write an atomic checkpoint into the run folder every N steps (0: never; "
                        "see docs/checkpoints.md)")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop right after the checkpoint of STEP (resume with --resume)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its checkpoint, appending to its "
                        "metrics; only --progress and --stop-after may be given with it")
    _TRAIN_DEFAULTS.update({a.dest: a.default for a in p._actions if a.dest != "help"})


# With --resume every option comes from the run folder; these cannot change its results.
_RESUME_OPTIONS = ("resume", "progress", "stop_after")
_TRAIN_DEFAULTS: dict[str, Any] = {}


def _resume(args: argparse.Namespace) -> int:
    from distsgd.runtime import resume

    given = [name for name, value in vars(args).items()
             if name in _TRAIN_DEFAULTS and name not in _RESUME_OPTIONS
             and value != _TRAIN_DEFAULTS[name]]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"{flag} cannot be given with --resume (the run's options come from "
                         "RUN_DIR); valid options with --resume: --progress, --stop-after")
    result = resume(args.resume, stop_after=args.stop_after,
                    progress=sys.stderr.isatty() if args.progress is None else args.progress)
    _print_result(result)
    return 0


def _print_result(result: Any) -> None:
    if result.summary:
        print(format_summary(result.summary, str(result.out)))
    else:  # stopped at a checkpoint (--stop-after)
        print(f"distsgd: stopped after the checkpoint at step {result.stopped_at}; continue "
              f"with: distsgd train --resume {result.out}")


def _parse_stragglers(items: list[str]) -> tuple[tuple[int, float], ...]:
    out = []
    for item in items:
        rank, sep, factor = item.partition(":")
        try:
            out.append((int(rank), float(factor)))
        except ValueError:
            raise UsageError(
                f"--straggler {item!r} is not RANK:FACTOR (e.g. --straggler 3:4)") from None
        if not sep:
            raise UsageError(f"--straggler {item!r} is not RANK:FACTOR (e.g. --straggler 3:4)")
    return tuple(out)


def _parse_links(items: list[str]) -> tuple[tuple[int, int, float, float], ...]:
    out = []
    for item in items:
        parts = item.split(":")
        try:
            if len(parts) != 4:
                raise ValueError(item)
            out.append((int(parts[0]), int(parts[1]), float(parts[2]), float(parts[3])))
        except ValueError:
            raise UsageError(f"--link {item!r} is not A:B:LATENCY:BANDWIDTH (e.g. --link "
                             "0:1:1e-3:1.25e7)") from None
    return tuple(out)


def _train(args: argparse.Namespace) -> int:
    from distsgd import launch
    from distsgd.config import RunConfig
    from distsgd.runtime import run

    if args.resume is not None:
        return _resume(args)
    backend = args.backend or ("torchrun" if launch.is_torchrun() else "sim")
    cfg = RunConfig.create(
        algorithm=args.algorithm, hyperparameters=algorithms.parse_settings(args.settings),
        workers=args.workers, backend=backend, dataset=args.dataset, model=args.model,
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed,
        eval_every=args.eval_every, sampling=args.sampling, compute_time=args.compute_time,
        stragglers=_parse_stragglers(args.straggler), slowdown=args.slowdown,
        on_divergence=args.on_divergence, on_failure=args.on_failure,
        links=_parse_links(args.link),
        latency=args.latency, bandwidth=args.bandwidth, timeout=args.timeout, out=args.out,
        data_dir=args.data_dir, checkpoint_every=args.checkpoint_every,
        stop_after=args.stop_after, device=args.device,
        progress=sys.stderr.isatty() if args.progress is None else args.progress)
    _print_result(run(cfg))
    return 0


def _compare_parser(sub: Any) -> None:
    from distsgd.compare import BACKENDS

    p = sub.add_parser(
        "compare", help="run a grid: algorithms x workers x hyperparameters x seeds",
        description="Run a grid of training runs, each cell a run folder under --out; cells "
                    "already finished there are not rerun. The grid comes from a TOML file (its "
                    "format: `python -c 'import distsgd.compare; help(distsgd.compare)'`), from "
                    "flags, or both (flags replace the file's entries).")
    p.add_argument("spec", nargs="?", metavar="GRID.toml", help="grid file")
    p.add_argument("--algorithm", "-a", metavar="A[,A...]", help="algorithms (`distsgd list`)")
    p.add_argument("--workers", "-n", metavar="N[,N...]", help="worker counts (default 4)")
    p.add_argument("--seed", metavar="S[,S...]", help="seeds (default 0)")
    p.add_argument("--set", dest="settings", action="append", default=[],
                   metavar="[ALGORITHM.]NAME=V[,V...]",
                   help="hyperparameter values, for every algorithm that has NAME (repeatable)")
    p.add_argument("--steps", type=int, help="steps per worker, every cell")
    p.add_argument("--epochs", type=float, help="passes over the training set, every cell")
    p.add_argument("--dataset", help="every cell's dataset")
    p.add_argument("--model", help="every cell's model")
    p.add_argument("--backend", choices=BACKENDS, help="every cell's backend (default sim)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="any other fixed run option, e.g. lr=0.1 or batch_size=16 (repeatable)")
    p.add_argument("--out", help="parent folder (default runs/compare-<time>); reuse it to resume")
    p.add_argument("--jobs", "-j", type=int, default=1, help="cells run at once (processes)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="live progress line (default: when stderr is a terminal)")


def _compare(args: argparse.Namespace) -> int:
    from distsgd import compare

    flags = {"steps": args.steps, "epochs": args.epochs, "dataset": args.dataset,
             "model": args.model, "backend": args.backend}
    options = {k: v for k, v in flags.items() if v is not None}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--option {item!r} is not NAME=VALUE (e.g. --option lr=0.1)")
        options[name.strip()] = value
    doc = compare.override(compare.load(args.spec) if args.spec else {},
                           algorithm=args.algorithm, workers=args.workers, seed=args.seed,
                           settings=args.settings, options=options)
    out = args.out or compare.default_out()
    results = compare.run_grid(doc, out, jobs=args.jobs,
                               display=compare.Display(sys.stderr, live=args.progress))
    print(compare.format_table(results))
    print(f"run folders: {out} (cells listed in grid.json)")
    return EXIT_FAILED if any(not r.ok for r in results) else 0


def _report_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="plots, an HTML page and a Markdown table from run folders",
        description="Report run folders: PNG plots, one self-contained report.html (plots, a "
                    "sortable summary table, the configs) and report.md (the table). A run still "
                    "going is reported with the evaluations written so far.")
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="run folders, or folders holding them (e.g. a `compare` --out)")
    p.add_argument("--out", default=None,
                   help="report folder (default DIR/report for one DIR, ./report for several)")


def _report(args: argparse.Namespace) -> int:
    from distsgd.report import make_report

    report = make_report(args.dirs, args.out)
    unfinished = sum(not r.finished for r in report.runs)
    print(f"distsgd report: {len(report.runs)} runs ({unfinished} unfinished) -> {report.out}")
    for path in (report.html, report.markdown, *report.plots):
        print(f"  {path}")
    return 0


def format_summary(s: dict[str, Any], out: str) -> str:
    def num(value: Any, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    hp = ", ".join(f"{k}={v}" for k, v in s["hyperparameters"].items()) or "none"
    per_worker = s["bytes_sent"] / max(1, s["workers"])
    lines = [
        f"distsgd {s['algorithm']} ({hp})",
        f"  {s['workers']} workers, backend {s['backend']}, {s['model']} on {s['dataset']}",
        f"  steps {s['steps']} ({s['epochs']:.1f} epochs)",
        f"  test accuracy       {num(s['test_accuracy'], '.4f')}",
        f"  train loss          {num(s['train_loss'], '.4f')}",
        f"  consensus distance  {num(s['consensus_distance'], '.4g')}",
        f"  bytes sent          {s['bytes_sent'] / 1e6:.2f} MB ({per_worker / 1e6:.2f} MB/worker)",
        f"  real time           {s['real_time_s']:.2f} s",
        f"  virtual time        {num(s['virtual_time_s'], '.4f')} s",
        f"  samples/s           {num(s['samples_per_s'], ',.0f')}",
        f"  run folder          {out}",
    ]
    return "\n".join(lines)


def describe_algorithms() -> str:
    """Every algorithm with its paper, its hyperparameters, their defaults and meaning."""
    out = []
    for name in sorted(algorithms.REGISTRY):
        cls = algorithms.REGISTRY[name]
        kind = "synchronous" if cls.synchronous else "asynchronous"
        out.append(f"{name}  [{kind}]\n  paper: {cls.paper}\n  sends: {cls.sends}\n"
                   f"  default lr: {cls().default_lr():g}")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            low, high = meta.get("low"), meta.get("high")
            limits = ""
            if meta.get("choices"):
                limits = f" (one of {', '.join(map(str, meta['choices']))})"
            elif low is not None or high is not None:
                lo = "-inf" if low is None else f"{low:g}"
                hi = "inf" if high is None else f"{high:g}"
                limits = f" (range {lo}..{hi})"
            out.append(f"    --set {f.name}={f.default}  {meta.get('help', '')}{limits}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _one_line(error: Exception) -> str:
    """The message on one line, whatever the user typed into it (an argument with a newline)."""
    return str(error).replace("\r", "\\r").replace("\n", "\\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="distsgd", description="Distributed SGD algorithms of the literature, "
                     "in a deterministic simulator and on real torch.distributed processes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    _compare_parser(sub)
    _report_parser(sub)
    from distsgd import project  # `distsgd project`: the scale projection (issue 4)
    project.add_parser(sub)
    sub.add_parser("list", help="every algorithm with its paper and hyperparameters")
    try:
        args = parser.parse_args(argv)
        if args.command == "list":
            sys.stdout.write(describe_algorithms())
            return 0
        if args.command == "report":
            return _report(args)
        if args.command == "project":
            return project.main(args)
        return _compare(args) if args.command == "compare" else _train(args)
    except UsageError as e:
        print(f"distsgd: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except DistSGDError as e:
        print(f"distsgd: run failed: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("distsgd: interrupted", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    sys.exit(main())



