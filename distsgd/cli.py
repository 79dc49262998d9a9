"""`distsgd train | list | compare | report | project`: the command line, what each command does
(the parsers, every option with its default and help, are in `distsgd.cli_args`).

Bad input (an unknown name, a value out of range, missing data) ends with exit status 2 and one
line naming the problem and the valid choices; a failed run (a crashed worker, a timeout, a
deadlock in the simulator) ends with exit status 1 and a line saying what happened. Ctrl-C (exit
130) and SIGTERM (exit 143) stop a command cleanly: one line, no worker process or temporary file
left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any, NoReturn

from distsgd import algorithms
from distsgd.cli_args import RESUME_OPTIONS, TRAIN_DEFAULTS, build_parser
from distsgd.errors import DistSGDError, StorageError, UsageError, check_range

EXIT_USAGE, EXIT_FAILED = 2, 1


def _resume(args: argparse.Namespace) -> int:
    from distsgd.runtime import resume

    given = [name for name, value in vars(args).items()
             if name in TRAIN_DEFAULTS and name not in RESUME_OPTIONS
             and value != TRAIN_DEFAULTS[name]]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"{flag} cannot be given with --resume (the run's options come from "
                         "RUN_DIR); valid options with --resume: --progress, --stop-after")
    result = resume(args.resume, stop_after=args.stop_after,
                    progress=sys.stderr.isatty() if args.progress is None else args.progress)
    _print_result(result)
    return 0


def _print_result(result: Any) -> None:
    if not result.reporting:  # a torchrun rank other than the first worker: the first reports
        return
    if result.summary:
        print(format_summary(result.summary, str(result.out)))
    else:  # stopped at a checkpoint (--stop-after)
        print(f"distsgd: stopped after the checkpoint at step {result.stopped_at}; continue "
              f"with: {result.resume_with}")


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
    from distsgd.comm.torch.group import is_torchrun
    from distsgd.config import RunConfig
    from distsgd.runtime import run

    if args.resume is not None:
        return _resume(args)
    backend = args.backend or ("torchrun" if is_torchrun() else "sim")
    cfg = RunConfig.create(
        algorithm=args.algorithm, hyperparameters=algorithms.parse_settings(args.settings),
        workers=_workers(args, backend), backend=backend, dataset=args.dataset, model=args.model,
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed,
        eval_every=args.eval_every, sampling=args.sampling, compute_time=args.compute_time,
        cores=args.cores,
        stragglers=_parse_stragglers(args.straggler), slowdown=args.slowdown,
        on_divergence=args.on_divergence, on_failure=args.on_failure,
        links=_parse_links(args.link),
        latency=args.latency, bandwidth=args.bandwidth, timeout=args.timeout, out=args.out,
        data_dir=args.data_dir, checkpoint_every=args.checkpoint_every,
        stop_after=args.stop_after, device=args.device, overwrite=args.overwrite,
        progress=sys.stderr.isatty() if args.progress is None else args.progress)
    _print_result(run(cfg))
    return 0


def _workers(args: argparse.Namespace, backend: str) -> int:
    """--workers, by default what a torchrun job holds (its processes less the algorithm's
    servers), else RunConfig's default."""
    from distsgd.config import RunConfig
    from distsgd.torchrun_job import torchrun_workers

    if args.workers is not None:
        return int(args.workers)
    held = None
    if backend == "torchrun":
        held = torchrun_workers(algorithms.create(args.algorithm,
                                                  algorithms.parse_settings(args.settings)))
    return RunConfig().workers if held is None else held


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


def _report(args: argparse.Namespace) -> int:
    from distsgd.report import make_report

    try:
        report = make_report(args.dirs, args.out)
    except OSError as e:  # what it reads is checked as it is read: this is a report file
        path = e.filename or args.out or "the report folder"
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from e
    unfinished = sum(not r.finished for r in report.runs)
    print(f"distsgd report: {len(report.runs)} runs ({unfinished} unfinished) -> {report.out}")
    for path in (report.html, report.markdown, *report.plots):
        print(f"  {path}")
    return 0


def _project(args: argparse.Namespace) -> int:
    from distsgd import project

    setting = project.Setting(params=args.params, bandwidth=args.bandwidth, latency=args.latency,
                              overhead=args.overhead, compute_time=args.compute_time,
                              warmup=args.warmup, window=args.window, slowdown=args.slowdown)
    setting.check()
    names, counts = _algorithm_names(args.algorithm), _worker_counts(args.workers)
    project.print_projection(names, counts, setting, algorithms.parse_settings(args.settings),
                             plot_path=args.plot, with_papers=args.papers)
    return 0


def _algorithm_names(text: str | None) -> list[str]:
    """`project --algorithm A,B`: every registered algorithm when not given."""
    if text is None:
        return sorted(algorithms.REGISTRY)
    names = [t.strip() for t in text.split(",")]
    for name in names:
        algorithms.get(name)  # UsageError naming the valid choices
    return names


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"--workers {text!r} is not a list of whole numbers >= 1 "
                         "(e.g. 4,8,16)") from None
    for n in counts:
        check_range("workers", n, 1)
    return counts


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
        f"  start-up            {num(s.get('startup_s'), '.2f')} s",
        f"  real time           {s['real_time_s']:.2f} s (from the first step)",
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that a run stops
    the same way: its workers and cells ended, its temporary files removed."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_like_sigint() -> Iterator[None]:
    """While a command runs, SIGTERM unwinds it as Ctrl-C does (the default would end the
    process at once, leaving worker processes and temporary files behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    with _sigterm_like_sigint():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "list":
            sys.stdout.write(describe_algorithms())
            return 0
        command = {"train": _train, "compare": _compare, "report": _report, "project": _project}
        return command[args.command](args)
    except UsageError as e:
        _say(f"distsgd: error: {_one_line(e)}")
        return EXIT_USAGE
    except DistSGDError as e:
        _say(f"distsgd: run failed: {_one_line(e)}")
        return EXIT_FAILED
    except Terminated:
        _say("distsgd: terminated")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        _say("distsgd: interrupted")
        return 130


def _say(line: str) -> None:
    """`line` on stderr in one write: the ranks of a torchrun job share one stream, and print's
    two writes (the text, then the newline) let their lines run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def entry() -> NoReturn:
    sys.exit(main())



