"""How a figure tells its series apart: a colour and a marker of their own for each of the first
20 series (then the same pairs, dashed), shared by the report's plots and `distsgd project`'s."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# matplotlib's ten (tab10), then ten more unlike any of them and readable on white.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#000075", "#800000", "#469990", "#c71585",
           "#f032e6", "#556b2f", "#b8860b", "#fa8072", "#4b0082", "#9acd32")
# Outlines that differ in shape, not only size (no circle-like octagon or hexagon pair).
MARKERS = ("o", "s", "^", "v", "D", "<", ">", "p", "h", "*", "X", "P", "d", "x", "+", "1",
           "2", "3", "4", "|")
LINESTYLES = ("-", "--", ":", "-.")
DISTINCT = len(COLOURS)


def series_style(i: int) -> dict[str, Any]:
    """Line style keywords of series `i`: pairs (colour, marker) distinct up to `DISTINCT`."""
    return {"color": COLOURS[i % DISTINCT], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i // DISTINCT % len(LINESTYLES)]}


def same_as(series: Sequence[Sequence[tuple[float, float]]],
            rel: float = 1e-6) -> list[int | None]:
    """For each series, the index of the first earlier one it coincides with (None: none):
    a figure marks those, since a line drawn over another hides it."""
    out: list[int | None] = []
    for i, points in enumerate(series):
        out.append(next((j for j in range(i) if out[j] is None
                         and _close(points, series[j], rel)), None))
    return out


def _close(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]],
           rel: float) -> bool:
    return len(a) == len(b) > 0 and all(
        xa == xb and abs(ya - yb) <= rel * max(abs(ya), abs(yb)) for (xa, ya), (xb, yb) in
        zip(a, b, strict=True))
