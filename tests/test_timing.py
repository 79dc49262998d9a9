"""Honest timing: `real_time_s` counts from the first training step, the start-up before it
(spawn, rendezvous, data, models) is the summary's `startup_s`, and samples/s excludes it.

A start-up delay is made by slowing the building of each worker's model (`train._initial_model`,
after the evaluator exists and before the first step): none of it may show in real time.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import distsgd
from distsgd import checkpoint, cli

train = importlib.import_module("distsgd.train")  # the module: the package's `train` is a function

pytestmark = pytest.mark.timeout(180)

DELAY = 1.0  # seconds of artificial start-up per simulated worker
RUN = dict(algorithm="allreduce", workers=2, dataset="digits", model="mlp", steps=4,
           eval_every=2, seed=0)


@contextlib.contextmanager
def _slow_start(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    built = train._initial_model

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(DELAY)
        return built(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train, "_initial_model", slow)
        yield


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def slow_cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`distsgd train` on the simulator with 2 × DELAY of start-up; its folder and end screen."""
    out = tmp_path_factory.mktemp("timing") / "run"
    screen = io.StringIO()
    with pytest.MonkeyPatch.context() as m, _slow_start(m), contextlib.redirect_stdout(screen):
        code = cli.main(["train", "-a", "allreduce", "--workers", "2", "--dataset", "digits",
                         "--model", "mlp", "--steps", "4", "--eval-every", "2", "--out",
                         str(out), "--no-progress"])
    assert code == 0
    return out, screen.getvalue()


def test_real_time_counts_from_the_first_step(slow_cli_run: tuple[Path, str]) -> None:
    out, _ = slow_cli_run
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["real_time_s"] == 0.0  # evaluated before the first step
    # Four steps of a small MLP: far below the start-up delay each worker had.
    assert rows[-1]["real_time_s"] < DELAY, rows


def test_summary_reports_startup_apart(slow_cli_run: tuple[Path, str]) -> None:
    out, _ = slow_cli_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["startup_s"] >= 2 * DELAY  # both simulated workers' delays
    assert summary["real_time_s"] == _metrics(out)[-1]["real_time_s"] < DELAY


def test_end_screen_prints_startup(slow_cli_run: tuple[Path, str]) -> None:
    out, screen = slow_cli_run
    summary = json.loads((out / "summary.json").read_text())
    line = re.search(r"^  start-up +([0-9.]+) s$", screen, re.MULTILINE)
    assert line is not None, screen
    assert float(line.group(1)) == pytest.approx(summary["startup_s"], abs=0.006)
    assert re.search(r"^  real time +[0-9.]+ s", screen, re.MULTILINE)


def test_end_screen_of_an_old_summary_says_na() -> None:
    """A summary written before start-up was measured still prints (report, resume)."""
    old = {"algorithm": "allreduce", "hyperparameters": {}, "workers": 2, "backend": "sim",
           "model": "mlp", "dataset": "digits", "steps": 4, "epochs": 0.1,
           "test_accuracy": 0.5, "train_loss": 1.0, "consensus_distance": 0.0,
           "bytes_sent": 10, "real_time_s": 1.0, "virtual_time_s": 0.1, "samples_per_s": 80.0}
    assert "  start-up            n/a s" in cli.format_summary(old, "run").splitlines()


def test_resume_keeps_real_time_counting_and_adds_startup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    distsgd.train(**RUN, checkpoint_every=2, stop_after=2, out=str(out))
    path = out / checkpoint.FILE
    saved = torch.load(path, weights_only=True)
    before = saved["evaluator"]
    assert before["startup_s"] > 0 and before["real_time_s"] > 0
    # A checkpoint from before startup_s existed: it must still resume.
    del saved["evaluator"]["startup_s"]
    torch.save(saved, path)
    with _slow_start(monkeypatch):
        resumed = distsgd.resume(str(out))
    rows = resumed.metrics
    assert [r["step"] for r in rows] == [0, 2, 4]
    # Real time goes on from the checkpoint's, without this invocation's start-up in it.
    assert before["real_time_s"] <= rows[-1]["real_time_s"] < before["real_time_s"] + DELAY
    assert resumed.summary["startup_s"] >= 2 * DELAY  # this invocation's; the old one unknown


@pytest.mark.processes
def test_samples_per_s_on_processes_counts_from_the_first_step(tmp_path: Path) -> None:
    """Real processes: their start-up (spawn, imports, rendezvous) takes seconds, training
    these 4 steps a fraction of one; throughput is over the training time only."""
    result = distsgd.train(**RUN, backend="processes", out=str(tmp_path / "run"))
    first, last, summary = result.metrics[0], result.metrics[-1], result.summary
    assert first["real_time_s"] == 0.0
    assert summary["startup_s"] > last["real_time_s"] > 0
    assert summary["samples_per_s"] == pytest.approx(last["samples"] / last["real_time_s"])
