"""One cell of a grid: its name, its checked config, and how its run ended."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsgd.config import RunConfig


@dataclass(frozen=True)
class Cell:
    """One run of the grid; `path` is its run folder, named `name` under the grid's folder."""

    name: str
    path: Path
    config: RunConfig
    options: dict[str, Any]  # the RunConfig coordinates: workers, seed and any other axis
    hyperparameters: dict[str, Any]  # the grid's values (the algorithm's defaults fill the rest)


def cell_name(algorithm: str, options: Mapping[str, Any], hyper: Mapping[str, Any]) -> str:
    """E.g. ``downpour-w4-period=4-seed0``: readable, and the same for the same coordinates."""
    rest = [(k, v) for k, v in options.items() if k not in ("workers", "seed")]
    parts = [algorithm, f"w{options['workers']}",
             *(f"{k}={value_text(v)}" for k, v in [*rest, *hyper.items()]),
             f"seed{options['seed']}"]
    # Only characters every file system and shell take as they are.
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def value_text(value: Any) -> str:
    """A coordinate as a cell's name and the final table write it: `true`, `1+2`, `0.1`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "+".join(value_text(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


@dataclass
class CellResult:
    """How a cell's run ended; a failed cell holds its error, never stops the grid."""

    cell: Cell
    status: str  # ran: ran now; reused: finished by an earlier invocation; failed
    summary: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"
