"""What a grid shows while it runs (`Display`) and when it is done (`format_table`)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from distsgd.compare.cell import Cell, CellResult, value_text


class Display:
    """Progress across the grid: a live line on a terminal (the running cells, their latest
    step and accuracy), plain lines otherwise; one line per finished cell either way."""

    refresh = 1.0  # seconds between redraws of the live line

    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total = self.done = 0
        self.drawn = False

    def begin(self, out: Path, total: int, reused: int, jobs: int) -> None:
        self.total, self.done = total, reused  # cells finished before: counted, not listed
        self._line(f"compare: {total} cells in {out} ({reused} finished before, "
                   f"{total - reused} to run, {jobs} at a time)")

    def running(self, cells: list[Cell], own_bar: bool = False) -> None:
        if own_bar:  # the run draws its own bar below this line
            if self.live:
                self._line(f"[{self.done}/{self.total}] running {cells[0].name}")
            return
        if not self.live:
            return
        parts = [f"{c.name} {_latest(c)}" for c in cells]
        text = f"[{self.done}/{self.total}] " + " | ".join(parts)
        width = shutil.get_terminal_size().columns - 1
        self.stream.write("\r\x1b[K" + text[:width])
        self.stream.flush()
        self.drawn = True

    def finished(self, result: CellResult) -> None:
        self.done += 1
        if result.ok:
            s = result.summary or {}
            how, tail = "done", (f"test accuracy {_num(s.get('test_accuracy'), '.4f')} "
                                 f"in {_num(s.get('real_time_s'), '.1f')} s")
        else:
            how, tail = "FAILED", _first_line(result.error)
        self._line(f"[{self.done}/{self.total}] {how}: {result.cell.name}  {tail}")

    def close(self) -> None:
        self._erase()

    def _line(self, text: str) -> None:
        self._erase()
        print(text, file=self.stream, flush=True)

    def _erase(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False


def _latest(cell: Cell) -> str:
    """The running cell's latest evaluation, read from its metrics.jsonl as the run writes it."""
    try:
        lines = (cell.path / "metrics.jsonl").read_text().splitlines()
        rec = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):  # not started, or a line half written
        rec = None
    if not rec:
        return "starting"
    total = "" if cell.config.steps is None else f"/{cell.config.steps}"
    return (f"step {rec['step']}{total} acc {_num(rec.get('test_accuracy'), '.3f')} "
            f"{rec.get('bytes_sent', 0) / 1e6:.1f} MB")


def _num(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "unknown error"


def format_table(results: Sequence[CellResult]) -> str:
    """Every cell's summary in one table; failed cells, with their errors, listed below it."""
    head = ("algorithm", "workers", "settings", "seed", "test acc", "virtual s", "MB sent")
    rows = [head, *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines += [f"failed: {r.cell.name}: {_first_line(r.error)}" for r in results if not r.ok]
    return "\n".join(lines)


def _row(result: CellResult) -> tuple[str, ...]:
    cell, s = result.cell, result.summary or {}
    rest = {k: v for k, v in cell.options.items() if k not in ("workers", "seed")}
    settings = " ".join(f"{k}={value_text(v)}" for k, v in {**rest, **cell.hyperparameters}.items())
    bytes_sent = s.get("bytes_sent")
    return (cell.config.algorithm, str(cell.config.workers), settings or "-",
            str(cell.config.seed),
            _num(s.get("test_accuracy"), ".4f") if result.ok else "FAILED",
            _num(s.get("virtual_time_s"), ".4g") if result.ok else "-",
            _num(None if bytes_sent is None else bytes_sent / 1e6, ".2f") if result.ok else "-")
