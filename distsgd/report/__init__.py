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

The package: `runs` (reading run folders), `plots` (the PNG figures), `table` (the summary
table's columns and the Markdown table), `page` (the HTML page).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distsgd.errors import UsageError
from distsgd.report.page import html_page
from distsgd.report.plots import PLOTS, write_plots
from distsgd.report.runs import Run, find_runs, label_runs, load_run
from distsgd.report.table import (
    COLUMNS,
    first_reaching,
    grid_targets,
    markdown_table,
    target_columns,
)

__all__ = ["Report", "Run", "find_runs", "first_reaching", "grid_targets", "html_page",
           "label_runs", "load_run", "make_report", "markdown_table", "target_columns",
           "write_plots"]


@dataclass(frozen=True)
class Report:
    """What `make_report` wrote, and the runs it read."""

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
    columns = COLUMNS + target_columns(grid_targets(dirs) if targets is None else targets)
    if out is None:
        out = Path(dirs[0], "report") if len(dirs) == 1 else Path("report")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out)
    for stale in set(PLOTS) - {p.name for p in plots}:  # left by an earlier report in `out`
        (out / stale).unlink(missing_ok=True)
    page, table = out / "report.html", out / "report.md"
    page.write_text(html_page(runs, plots, dirs, columns))
    table.write_text(markdown_table(runs, columns))
    return Report(out, page, table, plots, runs)
