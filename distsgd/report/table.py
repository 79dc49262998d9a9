"""The summary table: its columns (the [report] targets' included) and the Markdown table."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from distsgd.errors import UsageError
from distsgd.report.runs import Run, is_number, mb_per_worker, value_text


def _hps(s: dict[str, Any]) -> str:
    """The hyperparameters a run set away from its algorithm's defaults (`distsgd list`); every
    one for an algorithm this distsgd does not know."""
    from distsgd import algorithms

    hps = s.get("hyperparameters")
    if not isinstance(hps, dict):
        return ""
    cls = algorithms.REGISTRY.get(s.get("algorithm"))  # type: ignore[arg-type]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING} if cls is not None else {}
    changed = {k: v for k, v in hps.items() if k not in defaults
               or value_text(v) != value_text(defaults[k])}
    return ", ".join(f"{k}={value_text(v)}" for k, v in changed.items()) or "defaults"


# (heading, value of a run, format of a number, in the Markdown table too)
Column = tuple[str, Callable[[Run], Any], str, bool]
COLUMNS: tuple[Column, ...] = (
    ("run", lambda r: r.label, "", True),
    ("status", lambda r: "finished" if r.finished else "unfinished", "", True),
    ("hyperparameters", lambda r: _hps(r.summary), "", False),
    ("workers", lambda r: r.summary.get("workers"), ".0f", True),
    ("backend", lambda r: r.summary.get("backend"), "", False),
    ("model", lambda r: r.summary.get("model"), "", False),
    ("dataset", lambda r: r.summary.get("dataset"), "", False),
    ("steps", lambda r: r.summary.get("steps"), ".0f", True),
    ("epochs", lambda r: r.summary.get("epochs"), ".2f", False),
    ("lr", lambda r: r.config.get("lr"), ".4g", False),
    ("test accuracy", lambda r: r.summary.get("test_accuracy"), ".4f", True),
    ("test loss", lambda r: r.summary.get("test_loss"), ".4f", False),
    ("train loss", lambda r: r.summary.get("train_loss"), ".4f", True),
    ("consensus distance", lambda r: r.summary.get("consensus_distance"), ".3g", True),
    ("MB sent / worker", lambda r: mb_per_worker(r.summary, r.summary.get("workers")), ".2f",
     True),
    ("real time (s)", lambda r: r.summary.get("real_time_s"), ".2f", True),
    ("virtual time (s)", lambda r: r.summary.get("virtual_time_s"), ".4g", True),
    ("samples/s", lambda r: r.summary.get("samples_per_s"), ",.0f", False),
    ("staleness mean", lambda r: r.summary.get("staleness_mean"), ".2f", False),
    ("folder", lambda r: str(r.path), "", False),
)
# [report] key: (the metric, whether it must fall to the target, how a heading names it)
_TARGETS = {"target_accuracy": ("test_accuracy", False, "acc ≥ {:g}"),
            "target_loss": ("test_loss", True, "test loss ≤ {:g}")}


def grid_targets(dirs: Iterable[str | Path]) -> dict[str, float]:
    """The [report] targets of the compare grids in `dirs`: grid.json in a folder given, or beside
    a run folder given; the first grid that sets a key wins."""
    targets: dict[str, float] = {}
    for d in dirs:
        for path in (Path(d) / "grid.json", Path(d).parent / "grid.json"):
            try:
                table = json.loads(path.read_text())["spec"]["report"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # no grid there, or one without targets
            if isinstance(table, dict):
                for key, value in table.items():
                    if key in _TARGETS and is_number(value):
                        targets.setdefault(key, float(value))
            break
    return targets


def target_columns(targets: dict[str, float]) -> tuple[Column, ...]:
    """Steps (Markdown too), virtual and real seconds to each target, in `_TARGETS` order."""
    unknown = sorted(set(targets) - set(_TARGETS))
    if unknown:
        raise UsageError(f"report: unknown target {unknown[0]!r}; valid targets: "
                         f"{', '.join(_TARGETS)}")
    columns: list[Column] = []
    for key, (metric, falls, name) in _TARGETS.items():
        if key not in targets:
            continue
        text = name.format(targets[key])
        for unit, field, fmt, markdown in (("steps", "step", ".0f", True),
                                           ("virtual s", "virtual_time_s", ".4g", True),
                                           ("real s", "real_time_s", ".2f", False)):
            def get(run: Run, metric: str = metric, falls: bool = falls,
                    target: float = targets[key], field: str = field) -> Any:
                reached = first_reaching(run.metrics, metric, target, falls)
                return None if reached is None else reached.get(field)
            columns.append((f"{unit} to {text}", get, fmt, markdown))
    return tuple(columns)


def first_reaching(metrics: Sequence[dict[str, Any]], metric: str, target: float,
                   falls: bool = False) -> dict[str, Any] | None:
    """The first evaluation whose `metric` is >= `target` (<= when it `falls`), or None."""
    for record in metrics:
        value = record.get(metric)
        if is_number(value) and (value <= target if falls else value >= target):
            return record
    return None


def cell_text(value: Any, fmt: str) -> str:
    """A table cell: n/a for a missing value, numbers in the column's format."""
    if value is None:
        return "n/a"
    if fmt and is_number(value):
        return format(value, fmt)
    return str(value)


def markdown_table(runs: list[Run], columns: Sequence[Column] = COLUMNS) -> str:
    columns = [c for c in columns if c[3]]
    rule = ["---" if not fmt else "---:" for _, _, fmt, _ in columns]
    lines = ["| " + " | ".join(h for h, *_ in columns) + " |", "| " + " | ".join(rule) + " |"]
    for run in runs:
        cells = [_markdown_escape(cell_text(get(run), fmt)) for _, get, fmt, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown_escape(text: str) -> str:
    # A pipe would end the cell; the others would turn a folder name into emphasis, links or HTML.
    out = " ".join(text.split())
    for ch in "\\`*_[]<>|":
        out = out.replace(ch, "\\" + ch)
    return out
