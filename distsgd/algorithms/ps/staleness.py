"""The servers' staleness figures: one float64 vector per shard, summed over shards, as metrics.

Staleness is counted in server versions: the updates applied between a worker's pull and its push.
The vector is (count, sum, max, largest SSP clock gap, histogram of HIST_BINS + 1 bins, the server
rank's bytes sent); vectors of several shards add up, but for the two maxima.
"""

from __future__ import annotations

from typing import Any

import torch

HIST_BINS = 64  # staleness 0..63, then one bin for everything older
STATS = 4 + HIST_BINS + 1 + 1


def stats_vector(histogram: list[int], max_gap: float, bytes_sent: int) -> torch.Tensor:
    """A shard's figures as one vector (`bytes_sent` is exact in float64 below 2^53)."""
    hist = torch.tensor(histogram, dtype=torch.float64)
    count = hist.sum()
    total = (hist[:HIST_BINS] * torch.arange(HIST_BINS, dtype=torch.float64)).sum() + (
        hist[HIST_BINS] * HIST_BINS)
    seen = [i for i, c in enumerate(histogram) if c]
    return torch.cat([torch.tensor([count, total, max(seen, default=0), max_gap],
                                   dtype=torch.float64), hist,
                      torch.tensor([float(bytes_sent)], dtype=torch.float64)])


def sum_stats(stats: list[torch.Tensor]) -> torch.Tensor:
    """Several shards' vectors as one: counts, histograms and server bytes add up."""
    total = torch.stack(stats).sum(0)
    total[2] = max(float(s[2]) for s in stats)
    total[3] = max(float(s[3]) for s in stats)
    return total


def stats_dict(stats: torch.Tensor, clock_gap: bool) -> dict[str, Any]:
    """The metrics of a stats vector: staleness, and the bytes the server ranks sent so far
    (their replies, which the workers' counts leave out)."""
    count = float(stats[0])
    hist = [int(c) for c in stats[4 : 4 + HIST_BINS + 1]]
    last = max((i for i, c in enumerate(hist) if c), default=-1)
    out = {"staleness_mean": float(stats[1]) / count if count else None,
           "staleness_max": int(stats[2]), "staleness_histogram": hist[: last + 1],
           "server_bytes_sent": int(stats[-1])}
    if clock_gap:
        out["ssp_max_clock_gap"] = float(stats[3])
    return out


def merge_figures(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """The staleness figures of several server shards as one set."""
    if len(figures) == 1:
        return figures[0]
    width = max(len(f["staleness_histogram"]) for f in figures)
    hist = [sum(f["staleness_histogram"][i] if i < len(f["staleness_histogram"]) else 0
                for f in figures) for i in range(width)]
    count = sum(hist)
    total = sum((f["staleness_mean"] or 0.0) * sum(f["staleness_histogram"]) for f in figures)
    merged = {"staleness_mean": total / count if count else None,
              "staleness_max": max(f["staleness_max"] for f in figures),
              "staleness_histogram": hist,
              "server_bytes_sent": sum(f["server_bytes_sent"] for f in figures)}
    if "ssp_max_clock_gap" in figures[0]:
        merged["ssp_max_clock_gap"] = max(f["ssp_max_clock_gap"] for f in figures)
    return merged
