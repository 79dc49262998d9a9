"""The command line: a short run writes the run folder; every bad input exits 2 with one message."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from distsgd import algorithms, cli
from distsgd.metrics import METRIC_FIELDS, SUMMARY_FIELDS

pytestmark = pytest.mark.timeout(120)

CHOICES = ", ".join(sorted(algorithms.REGISTRY))  # every algorithm, in the order errors list them


def test_short_run_writes_the_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    code = cli.main(["train", "--algorithm", "sgp", "--workers", "3", "--steps", "12",
                     "--eval-every", "4", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and str(out) in printed

    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == "sgp" and config["workers"] == 3
    # resolved, so the run can be repeated
    assert config["hyperparameters"] == {"peers": 1, "overlap": False, "synch_freq": 0}

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 4, 8, 12]
    for r in lines:
        assert set(METRIC_FIELDS) <= set(r)
        assert r["real_time_s"] >= 0 and r["virtual_time_s"] is not None
        assert 0.0 <= r["test_accuracy"] <= 1.0
    assert [r["bytes_sent"] for r in lines] == sorted(r["bytes_sent"] for r in lines)
    assert lines[-1]["bytes_sent"] > lines[0]["bytes_sent"]

    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_FIELDS) <= set(summary)
    assert summary["steps"] == 12 and summary["backend"] == "sim"
    assert summary["test_accuracy"] == lines[-1]["test_accuracy"]
    assert math.isfinite(summary["train_loss"]) and summary["samples_per_s"] > 0


def test_set_is_typed_from_the_config(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli.main(["train", "-a", "crossover", "--set", "segments=2", "--set", "fair=false",
                     "--workers", "3", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    hp = json.loads((out / "config.json").read_text())["hyperparameters"]
    assert hp == {"segments": 2, "fair": False, "groups": 0}


def test_list_documents_every_algorithm(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    text = capsys.readouterr().out
    for name, cls in algorithms.REGISTRY.items():
        assert name in text and cls.paper in text
    assert "--set period=4" in text  # a hyperparameter with its default


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "allreduse"], "unknown algorithm 'allreduse' (did you mean 'allreduce'?); "
                                   f"valid choices: {CHOICES}\n"),
    (["--workers", "0"], "workers=0 is out of range: valid values lie in [1, 4096]"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'; valid choices: digits, fashion-mnist"),
    (["--model", "vgg"], "unknown model 'vgg'; valid choices: mlp, cnn"),
    (["-a", "local-sgd", "--set", "period=0"], "period=0 is out of range"),
    (["-a", "local-sgd", "--set", "perod=3"], "no hyperparameter 'perod' (did you mean "
                                              "'period'?); valid hyperparameters: period"),
    (["-a", "local-sgd", "--set", "period=two"], "period='two' is not a valid int"),
    (["-a", "easgd", "--set", "beta=1.5"], "beta=1.5 is out of range: valid values lie in [0, 1]"),
    (["--set", "period"], "is not NAME=VALUE"),
    (["--lr", "-1"], "lr=-1.0 is out of range"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
    (["--momentum", "1.5"], "momentum=1.5 is out of range"),
    (["--steps", "0"], "steps=0 is out of range"),
    (["--steps", "5", "--epochs", "1"], "not allowed with argument"),
    (["--compute-time", "fast"], "compute_time='fast' is not valid"),
    (["--backend", "mpi"], "invalid choice: 'mpi'"),
    (["--batch-size", "5000"], "batch"),
    (["-a", "sgp", "--set", "peers=3", "--workers", "4"], "peers=3 is out of range for 4 workers"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}"], "cifar10"),
])
def test_bad_input_exits_2_with_one_message(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = tmp_path / "never"
    length = [] if "--steps" in argv or "--epochs" in argv else ["--steps", "3"]
    code = cli.main(["train", *argv, *length, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("distsgd: error: ")
    assert "Traceback" not in err


def test_the_installed_command_reports_errors_without_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "distsgd", "train", "--workers", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("distsgd: error: workers=0 is out of range: valid values lie in "
                                   "[1, 4096]")
