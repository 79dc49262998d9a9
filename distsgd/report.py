"""`distsgd report`: plots, one self-contained HTML page and a Markdown table from run folders.

    report = make_report(["runs/grid"], "runs/grid/report")
    report.html     # plots embedded as data URIs, a sortable summary table, every run's config

A run folder is a folder with `config.json` (the first file a run writes); its `metrics.jsonl` may
still be growing and its `summary.json` may not exist yet: such a run is reported as unfinished,
with the figures of its last evaluation. Everything read from a folder is data, never markup: it is
escaped on the way into HTML and Markdown.

A `distsgd compare` folder whose grid file has a [report] table (``target_accuracy``,
``target_loss``) adds, for each target, when each run first reached it: the steps per worker and
the virtual and real seconds of the first evaluation with test accuracy >= the target (test loss
<= the target). A run that never reached it shows n/a.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from distsgd.errors import UsageError

# Config fields that never tell two runs apart in a label (where files go, how it was watched).
_NOT_DISTINGUISHING = ("algorithm", "hyperparameters", "out", "data_dir", "progress", "timeout")
_PLOTS = ("vs_steps.png", "vs_virtual_time.png", "vs_real_time.png", "vs_bytes_sent.png",
          "consensus_distance.png", "staleness.png")


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]  # summary.json, or the same figures from the last evaluation so far
    finished: bool  # summary.json exists
    label: str = ""


@dataclass(frozen=True)
class Report:
    out: Path
    html: Path
    markdown: Path
    plots: list[Path]
    runs: list[Run]


def make_report(dirs: Sequence[str | Path], out: str | Path | None = None,
                targets: dict[str, float] | None = None) -> Report:
    """Report the runs in `dirs` (run folders, or folders holding run folders at any depth).

    `out` defaults to DIR/report for one DIR and ./report for several; `targets` (keys as in a
    grid file's [report] table) default to those of the compare grids among `dirs`. Raises
    `UsageError` for a missing folder, a folder holding no run, or a run file that is not valid
    JSON.
    """
    if not dirs:
        raise UsageError("report: give at least one run folder or folder holding run folders")
    runs = label_runs(find_runs(dirs))
    columns = _COLUMNS + target_columns(grid_targets(dirs) if targets is None else targets)
    if out is None:
        out = Path(dirs[0], "report") if len(dirs) == 1 else Path("report")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out)
    for stale in set(_PLOTS) - {p.name for p in plots}:  # left by an earlier report in `out`
        (out / stale).unlink(missing_ok=True)
    page, table = out / "report.html", out / "report.md"
    page.write_text(html_page(runs, plots, dirs, columns))
    table.write_text(markdown_table(runs, columns))
    return Report(out, page, table, plots, runs)


# --- finding and reading runs -------------------------------------------------------------------

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
    metrics = _read_metrics(path / "metrics.jsonl")
    summary_path = path / "summary.json"
    if summary_path.exists():
        return Run(path, config, metrics, _read_json(summary_path), True)
    return Run(path, config, metrics, _partial_summary(config, metrics), False)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"report: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"report: {path} does not hold a JSON object")
    return data


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []  # a run that has only just started
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
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
        parts = [f"{k}={_text(v)}" for k, v in hps.items()
                 if _differs(k, [c.get("hyperparameters") or {} for c in peers])]
        parts += [f"{k}={_text(run.config[k])}" for k in varying
                  if k in run.config and (k != "lr" or _differs(k, peers))]
        labels.append(" ".join([algorithm, ", ".join(parts)]).strip())
    return [Run(r.path, r.config, r.metrics, r.summary, r.finished,
                label if labels.count(label) == 1 else f"{label} [{r.path.name}]")
            for r, label in zip(runs, labels, strict=True)]


def _differs(key: str, configs: list[dict[str, Any]]) -> bool:
    """Whether `key` takes more than one value among the configs that have it."""
    return len({json.dumps(c[key], sort_keys=True) for c in configs if key in c}) > 1


def _text(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, float):
        return format(value, ".6g")  # 0.005, not 0.004999999999999999 (0.05 * (1 - 0.9))
    return value if isinstance(value, str) else json.dumps(value)


# --- plots --------------------------------------------------------------------------------------

# (file, x-axis title, x of a run's metrics line); a run without any x (e.g. no virtual time on
# real processes) is left out of that figure.
_X_AXES: tuple[tuple[str, str, Callable[[Run, dict[str, Any]], Any]], ...] = (
    ("vs_steps.png", "steps per worker", lambda run, m: m.get("step")),
    ("vs_virtual_time.png", "virtual time (s, simulated cluster)",
     lambda run, m: m.get("virtual_time_s")),
    ("vs_real_time.png", "real time (s)", lambda run, m: m.get("real_time_s")),
    ("vs_bytes_sent.png", "MB sent per worker", lambda run, m: _mb(m, run.config.get("workers"))),
)
_Series = tuple[list[float], list[float]]


def write_plots(runs: list[Run], out: Path) -> list[Path]:
    figures = {}
    for name, xlabel, x in _X_AXES:
        def panel(y: str, x: Callable[[Run, dict[str, Any]], Any] = x) -> Callable[[Run], _Series]:
            return lambda run: _series(run.metrics, lambda m: x(run, m), lambda m: m.get(y))

        # Communication-efficient methods send orders of magnitude less: bytes on a log axis.
        figures[name] = _curves(runs, xlabel, [("test accuracy", panel("test_accuracy")),
                                               ("train loss", panel("train_loss"))],
                                log_x=name == "vs_bytes_sent.png")
    figures["consensus_distance.png"] = _curves(runs, "steps per worker", [(
        "consensus distance (mean ||x_i - x̄||)",
        lambda run: _series(run.metrics, lambda m: m.get("step"),
                            lambda m: m.get("consensus_distance")))])
    figures["staleness.png"] = _staleness(runs)
    written = []
    for name, fig in figures.items():
        if fig is not None:
            # Figure.savefig renders with Agg and never touches pyplot's global state or a display.
            fig.savefig(out / name, dpi=100)
            written.append(out / name)
    return written


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(metrics: list[dict[str, Any]], x: Callable[[dict[str, Any]], Any],
            y: Callable[[dict[str, Any]], Any]) -> _Series:
    """The points with both coordinates known (train loss is null at step 0: no point there)."""
    kept = [(float(a), float(b)) for a, b in ((x(m), y(m)) for m in metrics)
            if _number(a) and _number(b)]
    return [a for a, _ in kept], [b for _, b in kept]


def _curves(runs: list[Run], xlabel: str,
            panels: list[tuple[str, Callable[[Run], _Series]]], log_x: bool = False) -> Any:
    """One figure, a panel per metric, one line per run; None when no run has a point. On a
    log x axis the points at x = 0 (nothing sent yet) are left out."""
    from matplotlib.figure import Figure

    data = [[panel(r) for r in runs] for _, panel in panels]
    if log_x:
        data = [[_positive(xs, ys) for xs, ys in panel] for panel in data]
    if not any(xs for panel in data for xs, _ in panel):
        return None
    ncols = 3 if len(panels) > 1 else 1  # legend columns: long labels overflow a narrow figure
    rows = math.ceil(len(runs) / ncols)  # legend rows below the panels
    fig = Figure(figsize=(5.5 * len(panels) + 1, 3.8 + 0.28 * rows), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, _), panel in zip(axes, panels, data, strict=True):
        for i, (run, (xs, ys)) in enumerate(zip(runs, panel, strict=True)):
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=run.label,
                        **_style(i))
        ax.set(xlabel=xlabel, ylabel=title, title=f"{title} against {xlabel.split(' (')[0]}")
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(ncols, len(names)),
               fontsize="small", frameon=False)
    return fig


def _positive(xs: list[float], ys: list[float]) -> _Series:
    kept = [(a, b) for a, b in zip(xs, ys, strict=True) if a > 0]
    return [a for a, _ in kept], [b for _, b in kept]


def _style(i: int) -> dict[str, Any]:
    # Ten colours, then the same colours dashed: a grid of 40 runs stays tellable apart.
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}


def _staleness(runs: list[Run]) -> Any:
    """A bar chart per parameter-server run: how many updates were how many versions stale."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    hists = [r.summary.get("staleness_histogram") for r in runs]
    shown = [(i, r, h) for i, (r, h) in enumerate(zip(runs, hists, strict=True))
             if isinstance(h, list) and all(map(_number, h)) and sum(h)]
    if not shown:
        return None
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
    for k, (i, run, hist) in enumerate(shown):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.bar(range(len(hist)), hist, color=f"C{i % 10}")
        mean, high = run.summary.get("staleness_mean"), run.summary.get("staleness_max")
        stats = f"mean {mean:.2f}, max {high}" if _number(mean) else f"max {high}"
        ax.set_title("\n".join(textwrap.wrap(f"{run.label} ({stats})", 48)), fontsize="small")
        ax.set(xlabel="staleness (server versions)", ylabel="updates")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("staleness of the applied updates (the last bar counts every older one)")
    return fig


# --- tables -------------------------------------------------------------------------------------

def _mb(figures: dict[str, Any], workers: Any) -> float | None:
    """MB sent per training worker, as `distsgd train` prints it: bytes_sent sums what the
    training workers sent, so a parameter server's replies (the pulls) are not in it."""
    sent = figures.get("bytes_sent")
    count = workers if isinstance(workers, int) and workers > 0 else 1
    return sent / count / 1e6 if _number(sent) else None


def _hps(s: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_text(v)}" for k, v in (s.get("hyperparameters") or {}).items())


# (heading, value of a run, format of a number, in the Markdown table too)
_COLUMNS: tuple[tuple[str, Callable[[Run], Any], str, bool], ...] = (
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
    ("MB sent / worker", lambda r: _mb(r.summary, r.summary.get("workers")), ".2f", True),
    ("real time (s)", lambda r: r.summary.get("real_time_s"), ".2f", True),
    ("virtual time (s)", lambda r: r.summary.get("virtual_time_s"), ".4g", True),
    ("samples/s", lambda r: r.summary.get("samples_per_s"), ",.0f", False),
    ("staleness mean", lambda r: r.summary.get("staleness_mean"), ".2f", False),
    ("folder", lambda r: str(r.path), "", False),
)


_Column = tuple[str, Callable[[Run], Any], str, bool]
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
                    if key in _TARGETS and _number(value):
                        targets.setdefault(key, float(value))
            break
    return targets


def target_columns(targets: dict[str, float]) -> tuple[_Column, ...]:
    """Steps (Markdown too), virtual and real seconds to each target, in `_TARGETS` order."""
    unknown = sorted(set(targets) - set(_TARGETS))
    if unknown:
        raise UsageError(f"report: unknown target {unknown[0]!r}; valid targets: "
                         f"{', '.join(_TARGETS)}")
    columns: list[_Column] = []
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
        if _number(value) and (value <= target if falls else value >= target):
            return record
    return None


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if fmt and _number(value):
        return format(value, fmt)
    return str(value)


def markdown_table(runs: list[Run], columns: Sequence[_Column] = _COLUMNS) -> str:
    columns = [c for c in columns if c[3]]
    rule = ["---" if not fmt else "---:" for _, _, fmt, _ in columns]
    lines = ["| " + " | ".join(h for h, *_ in columns) + " |", "| " + " | ".join(rule) + " |"]
    for run in runs:
        cells = [_markdown_escape(_cell(get(run), fmt)) for _, get, fmt, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown_escape(text: str) -> str:
    # A pipe would end the cell; the others would turn a folder name into emphasis, links or HTML.
    out = " ".join(text.split())
    for ch in "\\`*_[]<>|":
        out = out.replace(ch, "\\" + ch)
    return out


# --- the HTML page ------------------------------------------------------------------------------

def html_page(runs: list[Run], plots: list[Path], dirs: Sequence[str | Path],
              columns: Sequence[_Column] = _COLUMNS) -> str:
    e = html.escape
    head = "".join(f'<th scope="col" aria-sort="none"><button type="button" data-type='
                   f'"{"num" if fmt else "text"}">{e(h)}</button></th>'
                   for h, _, fmt, _ in columns)
    rows = "".join(f"<tr>{''.join(_html_cell(get(r), fmt) for _, get, fmt, _ in columns)}</tr>\n"
                   for r in runs)
    figures = "".join(
        f'<figure><img alt="{e(p.stem.replace("_", " "))}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"><figcaption>{e(p.name)}'
        "</figcaption></figure>\n" for p in plots)
    configs = "".join(
        f"<details><summary>{e(r.label)} <span class=\"path\">{e(str(r.path))}</span></summary>"
        f"<pre>{e(json.dumps(r.config, indent=2))}</pre></details>\n" for r in runs)
    unfinished = sum(not r.finished for r in runs)
    meta = (f"{len(runs)} runs ({unfinished} unfinished: figures of their last evaluation so far)"
            if unfinished else f"{len(runs)} runs")
    sources = ", ".join(f"<code>{e(str(d))}</code>" for d in dirs)
    made = e(time.strftime("%Y-%m-%d %H:%M:%S"))
    return _PAGE.format(csp=_CSP, meta=meta, sources=sources, made=made, head=head, rows=rows,
                        figures=figures, configs=configs)


def _html_cell(value: Any, fmt: str) -> str:
    text = html.escape(_cell(value, fmt))
    if not fmt:
        return f"<td>{text}</td>"
    key = repr(float(value)) if _number(value) else ""  # sorted by the value, not its rounding
    return f'<td class="num" data-value="{key}">{text}</td>'


_SCRIPT = """
"use strict";
// Click a heading to sort by it; again to reverse. Missing values (n/a) stay last either way.
(function () {
  const table = document.getElementById("summary");
  const body = table.tBodies[0];
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach(function (th, col) {
    const button = th.querySelector("button");
    button.addEventListener("click", function () {
      const descending = th.getAttribute("aria-sort") === "ascending";
      const numeric = button.dataset.type === "num";
      const key = function (row) {
        const cell = row.cells[col];
        return numeric ? cell.dataset.value : cell.textContent;
      };
      const rows = Array.from(body.rows);
      rows.sort(function (a, b) {
        const x = key(a), y = key(b);
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        const order = numeric ? Number(x) - Number(y)
                              : x.localeCompare(y, undefined, {numeric: true});
        return descending ? -order : order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      heads.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
      th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    });
  });
  table.dataset.sortable = "ready";
})();
"""

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1280px;
       padding: 0 1em; color: #222; }
.meta, .path { color: #666; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th button { font: inherit; font-weight: 600; border: 0; background: none; cursor: pointer;
            padding: 0; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
tbody tr:hover { background: #f4f7fb; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #666; font-size: 12px; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: 12px; }
details { margin: .3em 0; }
"""

# No external asset: the page must work offline and from a mail attachment, and this policy makes
# the browser refuse anything a folder's text might smuggle in besides.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>distsgd report</title>
<style>""" + _STYLE.replace("{", "{{").replace("}", "}}") + """</style>
</head>
<body>
<h1>distsgd report</h1>
<p class="meta">{meta} from {sources}; made {made}.</p>
<h2>Summary</h2>
<p class="meta">Click a column heading to sort by it. Bytes are per training worker.</p>
<div class="wide"><table id="summary">
<thead><tr>{head}</tr></thead>
<tbody>
{rows}</tbody>
</table></div>
<h2>Plots</h2>
{figures}<h2>Configurations</h2>
{configs}<script>""" + _SCRIPT.replace("{", "{{").replace("}", "}}") + """</script>
</body>
</html>
"""
