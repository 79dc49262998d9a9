"""The report's figures: each metric against steps, virtual time, real time and bytes sent, the
consensus distance, and the staleness histograms of parameter-server runs (PNG, via Agg)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distsgd.report.runs import Run, is_number, mb_per_worker
from distsgd.report.style import series_style

PLOTS = ("vs_steps.png", "vs_virtual_time.png", "vs_real_time.png", "vs_bytes_sent.png",
         "consensus_distance.png", "staleness.png")  # every file `write_plots` may write
# (file, x-axis title, x of a run's metrics line); a run without any x (e.g. no virtual time on
# real processes) is left out of that figure.
_X_AXES: tuple[tuple[str, str, Callable[[Run, dict[str, Any]], Any]], ...] = (
    ("vs_steps.png", "steps per worker", lambda run, m: m.get("step")),
    ("vs_virtual_time.png", "virtual time (s, simulated cluster)",
     lambda run, m: m.get("virtual_time_s")),
    ("vs_real_time.png", "real time (s)", lambda run, m: m.get("real_time_s")),
    ("vs_bytes_sent.png", "MB sent per worker",
     lambda run, m: mb_per_worker(m, run.config.get("workers"))),
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


def _series(metrics: list[dict[str, Any]], x: Callable[[dict[str, Any]], Any],
            y: Callable[[dict[str, Any]], Any]) -> _Series:
    """The points with both coordinates known (train loss is null at step 0: no point there)."""
    kept = [(float(a), float(b)) for a, b in ((x(m), y(m)) for m in metrics)
            if is_number(a) and is_number(b)]
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
                # About a dozen markers a line: enough to tell it, too few to blot it out.
                ax.plot(xs, ys, label=run.label, markevery=max(1, len(xs) // 12),
                        markersize=5, fillstyle="none", **series_style(i))
        ax.set(xlabel=xlabel, ylabel=title, title=f"{title} against {xlabel.split(' (')[0]}")
        if log_x:
            shown = [x for xs, _ in panel for x in xs]
            if shown:
                log_axis(ax, min(shown), max(shown))
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(ncols, len(names)),
               fontsize="small", frameon=False)
    return fig


def _positive(xs: list[float], ys: list[float]) -> _Series:
    kept = [(a, b) for a, b in zip(xs, ys, strict=True) if a > 0]
    return [a for a, _ in kept], [b for _, b in kept]


def log_axis(ax: Any, low: float, high: float) -> None:
    """A log x axis over [low, high] with plain labels that never run into each other.

    matplotlib's own labels a range under a few decades at its minor ticks too (2×10⁻¹,
    3×10⁻¹, ...), which crowd a narrow panel; here only 1, 2, 5 × 10^k are labelled over less
    than two decades, only whole decades (at most eight) over more, and the minor ticks never.
    """
    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator, NullFormatter

    ax.set_xscale("log")
    decades = math.log10(high / low) if 0 < low < high else 0.0
    subs = (1.0, 2.0, 5.0) if decades < 2 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=6))
    # Plain numbers while they stay short (0.05, 20), powers of ten (10⁻⁷) past four decades.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}") if decades < 4
                                 else LogFormatterSciNotation())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _staleness(runs: list[Run]) -> Any:
    """A bar chart per parameter-server run: how many updates were how many versions stale."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    hists = [r.summary.get("staleness_histogram") for r in runs]
    shown = [(i, r, h) for i, (r, h) in enumerate(zip(runs, hists, strict=True))
             if isinstance(h, list) and all(map(is_number, h)) and sum(h)]
    if not shown:
        return None
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
    for k, (i, run, hist) in enumerate(shown):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.bar(range(len(hist)), hist, color=series_style(i)["color"])
        mean, high = run.summary.get("staleness_mean"), run.summary.get("staleness_max")
        stats = f"mean {mean:.2f}, max {high}" if is_number(mean) else f"max {high}"
        ax.set_title("\n".join(textwrap.wrap(f"{run.label} ({stats})", 48)), fontsize="small")
        ax.set(xlabel="staleness (server versions)", ylabel="updates")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("staleness of the applied updates (the last bar counts every older one)")
    return fig
