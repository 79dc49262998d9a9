"""Reading run folders: a `Run` per folder with config.json, finished or still going, and the
label that tells it apart from the other runs of a report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from distsgd.errors import UsageError

# Config fields that never tell two runs apart in a label (where files go, how it was watched).
_NOT_DISTINGUISHING = ("algorithm", "hyperparameters", "out", "data_dir", "progress", "timeout")


@dataclass(frozen=True)
class Run:
    """One run folder as read, finished or still going."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]  # summary.json, or the same figures from the last evaluation so far
    finished: bool  # summary.json exists
    label: str = ""



def find_runs(dirs: Iterable[str | Path]) -> list[Run]:
    found: dict[Path, Run] = {}
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise UsageError(f"report: {str(root)!r} {what}; give run folders or folders holding "
                             "them")
        paths = [Path(p) for p, _, files in sorted(os.walk(root)) if "config.json" in files]
        if not paths:
            raise UsageError(f"report: {str(root)!r} holds no run folder (a folder with "
                             "config.json, as `distsgd train --out` writes)")
        for path in paths:
            found.setdefault(path.resolve(), load_run(path))  # a run named twice is reported once
    return list(found.values())


def load_run(path: Path) -> Run:
    config = _read_json(path / "config.json")
    _check_config(path / "config.json", config)
    metrics = _read_metrics(path / "metrics.jsonl")
    summary_path = path / "summary.json"
    if summary_path.exists():
        return Run(path, config, metrics, _read_json(summary_path), True)
    return Run(path, config, metrics, _partial_summary(config, metrics), False)


def _check_config(path: Path, config: dict[str, Any]) -> None:
    """Each option config.json holds has its type (lists stand for tuples): a report reads them
    as such. Options it lacks (an older version's run) or does not know are left alone."""
    from distsgd.config import RunConfig
    from distsgd.errors import check_type

    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name in config:
            try:
                check_type(f.name, _tuples(config[f.name]), hints[f.name])
            except UsageError as e:
                raise UsageError(f"report: {path} is not a distsgd run config: {e}") from None


def _tuples(value: Any) -> Any:
    return tuple(map(_tuples, value)) if isinstance(value, list) else value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"report: {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"report: cannot read {path}: {e.strerror}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise UsageError(f"report: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"report: {path} does not hold a JSON object")
    return data


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []  # a run that has only just started
    text = _read_text(path)
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            if number == len(lines) and not text.endswith("\n"):
                break  # a running run is half-way through appending its last line
            raise UsageError(f"report: {path} line {number} is not valid JSON") from None
        if not isinstance(record, dict):
            raise UsageError(f"report: {path} line {number} is not a JSON object")
        if record:
            records.append(record)
    return records


def _partial_summary(config: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures summary.json will hold, from the evaluations written so far."""
    last = metrics[-1] if metrics else {}
    losses = [r["train_loss"] for r in metrics if r.get("train_loss") is not None]
    elapsed = last.get("virtual_time_s") or last.get("real_time_s")
    return {
        **{k: config.get(k) for k in ("algorithm", "hyperparameters", "backend", "workers",
                                      "model", "dataset")},
        **last,
        "steps": last.get("step"),
        "epochs": last.get("epoch"),
        "train_loss": losses[-1] if losses else None,
        "samples_per_s": last["samples"] / elapsed if elapsed and "samples" in last else None,
    }


def label_runs(runs: list[Run]) -> list[Run]:
    """Name each run by its algorithm and the options in which it differs from the others.

    Hyperparameters and the learning rate (whose default is the algorithm's) are compared among
    runs of the same algorithm only; an option a run's config lacks (written by an older version)
    tells nothing. Runs whose configs are identical (reruns) are told apart by their folder.
    """
    keys = [k for r in runs for k in r.config if k not in _NOT_DISTINGUISHING]
    varying = [k for k in dict.fromkeys(keys) if _differs(k, [r.config for r in runs])]
    labels = []
    for run in runs:
        algorithm = str(run.config.get("algorithm", "?"))
        peers = [r.config for r in runs if r.config.get("algorithm") == algorithm]
        hps = run.config.get("hyperparameters") or {}
        parts = [f"{k}={value_text(v)}" for k, v in hps.items()
                 if _differs(k, [c.get("hyperparameters") or {} for c in peers])]
        parts += [f"{k}={value_text(run.config[k])}" for k in varying
                  if k in run.config and (k != "lr" or _differs(k, peers))]
        labels.append(" ".join([algorithm, ", ".join(parts)]).strip())
    return [Run(r.path, r.config, r.metrics, r.summary, r.finished,
                label if labels.count(label) == 1 else f"{label} [{r.path.name}]")
            for r, label in zip(runs, labels, strict=True)]


def _differs(key: str, configs: list[dict[str, Any]]) -> bool:
    """Whether `key` takes more than one value among the configs that have it."""
    return len({json.dumps(c[key], sort_keys=True) for c in configs if key in c}) > 1


def value_text(value: Any) -> str:
    """A config value as a label writes it: none as the default, floats short, JSON else."""
    if value is None:
        return "default"
    if isinstance(value, float):
        return format(value, ".6g")  # 0.005, not 0.004999999999999999 (0.05 * (1 - 0.9))
    return value if isinstance(value, str) else json.dumps(value)



def is_number(value: Any) -> TypeGuard[float]:
    """A finite int or float (not a bool): what a plot or a numeric column can use."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)



def mb_per_worker(figures: dict[str, Any], workers: Any) -> float | None:
    """MB sent per training worker, as `distsgd train` prints it: bytes_sent sums what the
    training workers sent, so a parameter server's replies (the pulls) are not in it."""
    sent = figures.get("bytes_sent")
    count = workers if isinstance(workers, int) and workers > 0 else 1
    return sent / count / 1e6 if is_number(sent) else None
