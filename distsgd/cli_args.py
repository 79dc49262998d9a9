"""The command line's parsers: `distsgd train | list | compare | report | project`, each option
with its default and help. What each command does is in `distsgd.cli`."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from distsgd import algorithms
from distsgd.errors import UsageError, did_you_mean

# With --resume every option comes from the run folder; these cannot change its results.
RESUME_OPTIONS = ("resume", "progress", "stop_after")
TRAIN_DEFAULTS: dict[str, Any] = {}  # `train`'s options and defaults, filled by `build_parser`


class Parser(argparse.ArgumentParser):
    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # argparse's own message, with the command's closest option
            command = self._commands().get(getattr(parsed, "command", None) or "", self)
            flags = [o for a in command._actions for o in a.option_strings]
            hint = next((h for word in extras if word.startswith("-")
                         if (h := did_you_mean(word.partition("=")[0], flags))), "")
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed

    def _commands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the message already names the option and its valid values.
        choice = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)$", message)
        if choice:
            message += did_you_mean(choice[1], re.findall(r"'(.*?)'", choice[2]))
        raise UsageError(message)


# `train --help` gives every option a line ending with its default (`_show_defaults`): the
# meaning of the options whose flag says too little, and what an absent option (None) means.
_HELP = {"momentum": "momentum μ of each worker's SGD (server algorithms apply their own)",
         "weight_decay": "L2 penalty added to every gradient", "workers": "training workers",
         "seed": "seeds the model, the data order and every random choice of the algorithms",
         "batch_size": "per worker", "data_dir": "dataset cache folder"}
_ABSENT = {"steps": "from --epochs", "data_dir": "$DISTSGD_DATA or ~/.cache/distsgd",
           "stop_after": "never", "resume": "a new run", "workers": "what the world holds"}


def _show_defaults(p: argparse.ArgumentParser) -> None:
    for action in p._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:
            continue
        text = action.help or _HELP.get(action.dest, "")
        if "default" not in text:
            value = action.default
            shown = (_ABSENT.get(action.dest, "") if value is None else
                     "none" if value == [] else ("on" if value else "off")
                     if isinstance(value, bool) else f"{value:g}" if isinstance(value, float)
                     else str(value))
            if shown:  # help strings are %-formatted: a literal % is %%
                text = f"{text} (default {shown.replace('%', '%%')})".lstrip()
        action.help = text


def build_parser() -> argparse.ArgumentParser:
    """`distsgd` and its commands; a parse error raises `UsageError`."""
    parser = Parser(prog="distsgd", description="Distributed SGD algorithms of the literature, "
                    "in a deterministic simulator and on real torch.distributed processes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _train_parser(sub)
    _compare_parser(sub)
    _report_parser(sub)
    _project_parser(sub)
    sub.add_parser("list", help="every algorithm with its paper and hyperparameters")
    return parser


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
    p.add_argument("--workers", "-n", type=int, default=None,
                   help=f"training workers (default {d.workers}; under torchrun: its processes "
                        "less the algorithm's servers)")
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
    p.add_argument("--cores", type=int, default=d.cores,
                   help="simulator: the cores all processes share; each step's compute takes "
                        "max(1, processes/cores)× as long (0: a core each)")
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it such an --out is refused)")
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
    _show_defaults(p)
    TRAIN_DEFAULTS.update({a.dest: a.default for a in p._actions if a.dest != "help"})


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


def _project_parser(sub: Any) -> None:
    # `distsgd project`: the scale projection (issue 4).
    from distsgd.project import WORKERS, Setting

    d = Setting()
    p = sub.add_parser(
        "project", help="predicted speed-up of every algorithm on 4..256 workers",
        description="Run every algorithm's real message pattern in the simulator with a "
                    "ResNet-50-sized model on a 10 GbE network and print the predicted speed-up "
                    "over one worker (table and PNG plot), then the papers' figures next to ours.")
    p.add_argument("--algorithm", "-a", metavar="A[,A...]",
                   help="algorithms (default: every registered one; `distsgd list`)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                   help="a hyperparameter, for every selected algorithm that has it "
                        "(repeatable; default: each algorithm's defaults)")
    p.add_argument("--workers", "-n", metavar="N[,N...]",
                   default=",".join(map(str, WORKERS)), help="worker counts (default %(default)s)")
    p.add_argument("--params", type=float, default=d.params,
                   help="float32 parameters per message (default %(default)g: ResNet-50)")
    p.add_argument("--bandwidth", type=float, default=d.bandwidth,
                   help="bytes/s per NIC and direction (default %(default)g: 10 GbE)")
    p.add_argument("--latency", type=float, default=d.latency,
                   help="seconds, one way (default %(default)g)")
    p.add_argument("--overhead", type=float, default=d.overhead,
                   help="seconds per message or collective (default %(default)g)")
    p.add_argument("--compute-time", type=float, default=d.compute_time,
                   help="seconds of forward+backward per step (default %(default).4g: a batch "
                        "of 32 at 367 images/s, ResNet-50 FP32 on one V100)")
    p.add_argument("--slowdown", default=d.slowdown,
                   help="seeded random slowdown of every step: none | lognormal:SIGMA")
    p.add_argument("--warmup", type=int, default=d.warmup, help="steps not measured")
    p.add_argument("--window", type=int, default=d.window, help="steps measured")
    p.add_argument("--plot", default="projection.png", help="PNG path (default %(default)s)")
    p.add_argument("--papers", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare with the papers' figures (default on)")

