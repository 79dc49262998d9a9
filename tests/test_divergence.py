"""A non-finite loss stops the run naming the worker and step, or (on request) skips that update;
NaNs never reach the results."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import distsgd
from distsgd import cli
from distsgd.errors import DivergenceError

train_module = sys.modules["distsgd.train"]  # `distsgd.train` names the function

pytestmark = pytest.mark.timeout(120)
TOO_LARGE = dict(lr=1e3, steps=20, model="mlp", dataset="synthetic", workers=2)


def test_a_non_finite_loss_stops_the_run_naming_worker_and_step(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match=r"worker \d diverged: loss nan at step \d+"):
        distsgd.train(**TOO_LARGE, out=str(tmp_path))
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert all(v is not None for k, v in record.items() if k not in ("virtual_time_s",
                                                                          "train_loss"))
    assert not (tmp_path / "summary.json").exists()


def test_the_cli_reports_divergence_in_one_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--lr", "1000", "--steps", "20", "--model", "mlp", "--dataset",
            "synthetic", "--workers", "2", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("distsgd: run failed: worker ") and "diverged: loss nan" in err
    assert err.count("\n") == 1


def test_skip_survives_an_occasional_nan_loss(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def flaky(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * math.nan if calls["n"] in (5, 9) else loss  # two poisoned batches

    monkeypatch.setattr(train_module.F, "cross_entropy", flaky)
    with pytest.raises(DivergenceError):
        distsgd.train(algorithm="allreduce", workers=2, steps=10, model="mlp",
                      out=str(tmp_path / "stop"))
    calls["n"] = 0
    result = distsgd.train(algorithm="allreduce", workers=2, steps=10, model="mlp",
                           on_divergence="skip", out=str(tmp_path / "skip"))
    assert all(torch.isfinite(w.state).all() for w in result.workers)
    assert all(math.isfinite(m["train_loss"]) for m in result.metrics if m["step"])
    assert result.summary["steps"] == 10
