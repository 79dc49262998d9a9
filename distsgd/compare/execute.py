"""Running a grid: the cells not yet finished, up to `jobs` at a time in a process pool; a cell
that fails is recorded and the others go on; `grid.json` (the ledger) says where each cell stands.
A later invocation into the same folder resumes: `finished_summary` decides what is reused."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
import traceback
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

from distsgd import runtime
from distsgd.compare.cell import Cell, CellResult
from distsgd.compare.display import Display
from distsgd.compare.grid import GridSpec
from distsgd.compare.pool import Died, Pool
from distsgd.config import RunConfig
from distsgd.errors import DistSGDError, UsageError, check_range
from distsgd.metrics import FolderLock, storing, unique_path, write_json


def default_out(root: str | Path = "runs") -> Path:
    """A fresh folder for a grid: runs/compare-<time>."""
    return unique_path(Path(root) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")


def run_grid(spec: GridSpec | Mapping[str, Any], out: str | Path, jobs: int = 1,
             display: Display | None = None) -> list[CellResult]:
    """Run every cell of `spec` not yet finished under `out`, up to `jobs` at a time.

    A failed cell is reported in its `CellResult` (and grid.json); it never stops the others.
    With jobs > 1 the cells run in spawned processes, so a script that calls this needs the
    usual ``if __name__ == "__main__":`` guard.
    """
    check_range("jobs", jobs, 1)
    grid = spec if isinstance(spec, GridSpec) else GridSpec.from_dict(spec)
    out = Path(out)
    cells = grid.cells(out)  # every config is checked before anything runs or is written
    display = display if display is not None else Display()
    results = {c.name: CellResult(c, "reused", s) for c in cells
               if (s := finished_summary(c)) is not None}
    todo = [c for c in cells if c.name not in results]
    if out.exists() and not out.is_dir():
        raise UsageError(f"out {str(out)!r} is a file, not a folder; valid: a new folder, or a "
                         "compare's folder to resume")
    with storing(out):
        out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out)  # a second compare into `out` is refused: it would clear our cells
    try:
        _write_ledger(out, grid, cells, results)
        display.begin(out, len(cells), len(results), jobs)
        # closing: on an interruption the cells still running are stopped here and now.
        with contextlib.closing(_execute(todo, jobs, display)) as finished:
            for result in finished:
                results[result.cell.name] = result
                _write_ledger(out, grid, cells, results)
                display.finished(result)
        display.close()
    finally:
        lock.release()
    return [results[c.name] for c in cells]


def finished_summary(cell: Cell) -> dict[str, Any] | None:
    """The summary in the cell's folder, if that folder holds a finished run of this config."""
    try:
        config = json.loads((cell.path / "config.json").read_text())
        summary = json.loads((cell.path / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    expected = json.loads(json.dumps(cell.config.to_json()))  # tuples read back as lists
    # progress only changes the display; out is the folder itself, which may have been moved.
    same = all(config.get(k) == v for k, v in expected.items() if k not in ("out", "progress"))
    return summary if same and set(config) == set(expected) else None


def _execute(cells: list[Cell], jobs: int,
             display: Display) -> Generator[CellResult, None, None]:
    if jobs == 1:
        # In this process: no start-up cost, and the run's own progress bar shows on a terminal.
        for cell in cells:
            _clear(cell.path)
            display.running([cell], own_bar=True)
            config = dataclasses.replace(cell.config, progress=display.live)
            yield _result(cell, *_run_cell(config))
        return
    yield from _parallel(cells, jobs, display)


def _parallel(cells: list[Cell], jobs: int,
              display: Display) -> Generator[CellResult, None, None]:
    """Up to `jobs` cells at once, each in a worker process that dies with this one (`Pool`);
    results as they come. Leaving early (Ctrl-C, SIGTERM, an error) stops the running cells."""
    pending = list(reversed(cells))
    by_name = {c.name: c for c in cells}
    with Pool(_run_cell, jobs) as pool:
        while pending or pool.running():
            # Submit no more than can run, so that the cells shown as running are.
            while pending and pool.free:
                cell = pending.pop()
                _clear(cell.path)
                pool.submit(cell.name, cell.config)
            display.running([by_name[str(name)] for name in pool.running()])
            for name, outcome in pool.wait(display.refresh):
                yield _collect(by_name[str(name)], outcome)


def _collect(cell: Cell, outcome: tuple[dict[str, Any] | None, str | None] | Died) -> CellResult:
    if isinstance(outcome, Died):  # this cell's process only: the others go on
        return CellResult(cell, "failed", error=f"its process died ({outcome.reason}; out of "
                          "memory?); run again to retry this cell")
    return _result(cell, *outcome)


def _result(cell: Cell, summary: dict[str, Any] | None, error: str | None) -> CellResult:
    return CellResult(cell, "failed" if error is not None else "ran", summary, error)


def _run_cell(config: RunConfig) -> tuple[dict[str, Any] | None, str | None]:
    """Run one cell; the error comes back as text (an exception may not pickle)."""
    try:
        return runtime.run(config).summary, None
    except Exception as e:
        path = Path(str(config.out))
        path.mkdir(parents=True, exist_ok=True)
        # A summary written before the failure must not make the cell look finished.
        (path / "summary.json").unlink(missing_ok=True)
        (path / "error.txt").write_text(traceback.format_exc())
        return None, _describe(e)


def _describe(e: BaseException) -> str:
    if isinstance(e, DistSGDError):
        return str(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _clear(path: Path) -> None:
    """An unfinished or outdated cell starts from an empty folder."""
    if path.exists():
        shutil.rmtree(path)


def _write_ledger(out: Path, grid: GridSpec, cells: list[Cell],
                  results: Mapping[str, CellResult]) -> None:
    def entry(cell: Cell) -> dict[str, Any]:
        result = results.get(cell.name)
        status = "pending" if result is None else "failed" if not result.ok else "finished"
        return {"name": cell.name, "algorithm": cell.config.algorithm, **cell.options,
                "hyperparameters": cell.hyperparameters, "status": status,
                "error": result.error if result is not None else None}

    write_json(out / "grid.json", {"description": grid.description, "spec": grid.source,
                                   "cells": [entry(c) for c in cells]})
