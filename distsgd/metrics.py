"""What a run measures, and the run folder it is written to.

    RUN/config.json     everything needed to rerun the job
    RUN/metrics.jsonl   one JSON object per evaluation, appended (and flushed) as the run goes
    RUN/summary.json    the final figures
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

# Fields every metrics line has (DESIGN.md); algorithms may add more (e.g. staleness).
METRIC_FIELDS = ("step", "epoch", "samples", "real_time_s", "virtual_time_s", "train_loss",
                 "test_loss", "test_accuracy", "consensus_distance", "bytes_sent")
SUMMARY_FIELDS = ("algorithm", "hyperparameters", "backend", "workers", "steps", "epochs",
                  "test_accuracy", "test_loss", "train_loss", "consensus_distance", "bytes_sent",
                  "bytes_sent_per_worker", "real_time_s", "virtual_time_s", "samples_per_s")


def unique_path(path: Path) -> Path:
    """`path`, or `path`-2, -3, ... if it exists: two runs started in the same second differ."""
    candidate, suffix = path, 1
    while candidate.exists():
        suffix += 1
        candidate = path.with_name(f"{path.name}-{suffix}")
    return candidate


def default_run_dir(algorithm: str, root: str | Path = "runs") -> Path:
    return unique_path(Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{algorithm}")


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.path / "config.json", config)

    def start_metrics(self) -> None:
        self.metrics_path.write_text("")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
            f.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The metrics lines so far; a run still writing may have left its last line half written,
    which is skipped."""
    lines = [line for line in Path(path, "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


def read_summary(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path, "summary.json").read_text())
