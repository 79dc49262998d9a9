"""Crafted files: a checkpoint, a config.json or a grid file of the wrong shape is one line
(exit 1 for a bad file, 2 for a bad grid file, as for any usage error), never a traceback, and
the run folder is left exactly as it was.

One tiny run (8 steps of an MLP on 2 workers, checkpointed every 2, stopped at 4) is the source
of every crafted folder; each case copies it and damages one field.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import distsgd.report
from distsgd import cli, runtime

pytestmark = pytest.mark.timeout(300)
Mutation = Callable[[dict[str, Any]], Any]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crafted") / "run"
    assert cli.main(["train", "--steps", "8", "--model", "mlp", "--workers", "2", "--eval-every",
                     "2", "--checkpoint-every", "2", "--stop-after", "4", "--out", str(out),
                     "--no-progress"]) == 0
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _craft(stopped: Path, where: Path, checkpoint: Mutation | None = None,
           config: Mutation | None = None) -> Path:
    run = where / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(stopped, run)
    if checkpoint is not None:
        saved = torch.load(run / "checkpoint.pt", weights_only=True)
        checkpoint(saved)
        torch.save(saved, run / "checkpoint.pt")
    if config is not None:
        text = config(json.loads((run / "config.json").read_text()))
        (run / "config.json").write_bytes(text if isinstance(text, bytes) else
                                          json.dumps(text).encode())
    return run


def _resume_fails(run: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Resume `run`, which must fail: exit 1, one line on stderr, the folder unchanged."""
    before = _files(run)
    code = cli.main(["train", "--resume", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED, err
    assert err.startswith("distsgd: run failed: ") and err.count("\n") == 1, err
    assert _files(run) == before
    return err


def _set(key: str, value: Any) -> Mutation:
    return lambda saved: saved.__setitem__(key, value)


def _worker(key: str, value: Any) -> Mutation:
    return lambda saved: saved["workers"][0].__setitem__(key, value)


@pytest.mark.parametrize("damage, words", [
    (_set("step", -4), "its step is -4; valid: a whole number in [1, 1000000000]"),
    (_set("step", 10**15), "its step is 1000000000000000; valid"),
    (_set("step", "forty"), "its step is 'forty'; valid"),
    (_set("step", 5), "its step 5 is not a checkpoint step of its run"),
    (_set("step", 8), "its step 8 is not a checkpoint step of its run"),
    (_set("step", 6), "worker 0's step is 4; valid: 6, the checkpoint's"),
    (_set("metrics_step", "x"), "its metrics_step is 'x'"),
    (_set("metrics_step", 9), "its metrics_step 9 is past the run's end"),
    (_set("evaluator", None), "its evaluator is None; valid: a dict with loss_sum"),
    (_set("evaluator", {"loss_sum": math.nan, "loss_count": 1, "real_time_s": 1.0}),
     "its evaluator loss_sum is nan"),
    (lambda s: s["workers"].append(s["workers"][0]), "holds 3 states of workers; its run has 2"),
    (lambda s: s["workers"].pop(), "holds 1 states of workers; its run has 2"),
    (_set("workers", []), "its workers is []"),
    (_set("servers", [{}]), "holds 1 states of servers; its run has 0"),
    (_set("world", None), "its simulated world's state is None"),
    (_set("world", {"seq": 1, "host_nics": ({}, {}), "ranks": []}), "ranks hold []"),
    (lambda s: s["world"].__setitem__("host_ingress_busy", {0: [(1.0,)]}),
     "its simulated world's host_ingress_busy is"),
    (lambda s: s["world"]["ranks"][0].__setitem__("ingress_busy", [(0.0, math.nan)]),
     "its simulated world's rank 0 is"),
    (lambda s: s["world"]["ranks"][1].__setitem__("cpu_debt", (-1.0, [])),
     "its simulated world's rank 1 is"),
    (_set("observer", 3), "its observer is 3"),
    (_set("config", "allreduce"), "its config is 'allreduce'"),
    (lambda s: s["config"].__setitem__("hyperparameters", 5),
     "belongs to another run: its hyperparameters is 5"),
    (lambda s: s["config"].__setitem__("workers", 3), "belongs to another run"),
    (lambda s: s["config"].__setitem__("seed", torch.zeros(2)), "its config cannot be read"),
    (_worker("step", "x"), "worker 0's step is 'x'"),
    (lambda s: s["workers"][0].pop("jitter"), "worker 0's state is"),
    (_worker("loss_sum", math.inf), "worker 0's loss_sum is inf"),
    (_worker("loss_count", -1), "worker 0's loss_count is -1"),
    (_worker("torch_rng", torch.zeros(3)), "worker 0's torch_rng"),
    (_worker("jitter", None), "worker 0's jitter is None"),
    (_worker("bytes_by_verb", {"send": -5}), "worker 0's bytes_by_verb"),
    (_worker("model", {}), "worker 0's model does not match the run's"),
    (lambda s: s["workers"][0]["model"].__setitem__("1.bias", torch.zeros(3)),
     "worker 0's model has 1.bias of shape (3,)"),
    (_worker("optimizer", {}), "worker 0's optimizer state cannot be loaded"),
    (lambda s: s["workers"][0]["optimizer"]["state"].__setitem__(
        0, {"momentum_buffer": torch.zeros(1)}), "worker 0's optimizer state has a momentum"),
])
def test_a_crafted_checkpoint_is_one_line_and_changes_nothing(
    damage: Mutation, words: str, stopped: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _resume_fails(_craft(stopped, tmp_path, checkpoint=damage), capsys)
    assert words in err, err


@pytest.mark.parametrize("damage, words", [
    (lambda c: {**c, "hyperparameters": 5}, "its hyperparameters is {}, the folder's config.json "
                                            "says 5"),
    (lambda c: b"\xff\xfe{}", "config.json is not a valid config file"),
    (lambda c: [c], "is not a distsgd run config"),
    (lambda c: {**c, "algorithm": None}, "is not a distsgd run config"),
])
def test_a_crafted_config_json_is_one_line_and_changes_nothing(
    damage: Mutation, words: str, stopped: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _resume_fails(_craft(stopped, tmp_path, config=damage), capsys)
    assert words in err, err


def test_a_config_invalid_in_both_files_is_the_files_fault(
    stopped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    run = _craft(stopped, tmp_path, checkpoint=lambda s: s["config"].__setitem__("lr", -1.0),
                 config=lambda c: {**c, "lr": -1.0})
    err = _resume_fails(run, capsys)  # exit 1, not 2: nothing the user typed was wrong
    assert "holds a run config that is not valid: lr=-1.0 is out of range" in err, err


def test_the_untouched_run_resumes(stopped: Path, tmp_path: Path) -> None:
    run = _craft(stopped, tmp_path)
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


@pytest.mark.parametrize("text, words", [
    (b'description = "\xff"\n[grid]\nalgorithm = ["sgp"]\n', "is not UTF-8 text (byte 15)"),
    (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nests its tables or lists too deeply"),
])
def test_a_grid_file_that_cannot_be_read_is_one_line(
    text: bytes, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_bytes(text)
    assert cli.main(["compare", str(grid), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ properties
# Values of every kind, the awkward ones included, for a field of the file.
values = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**16), st.floats(allow_nan=True),
    st.text(max_size=6), st.lists(st.integers(-2, 9), max_size=3),
    st.dictionaries(st.sampled_from(["seq", "loss_sum", "state", "x"]), st.integers(-1, 9),
                    max_size=2),
    st.builds(torch.zeros, st.integers(0, 4)),
)
TOP = ["step", "metrics_step", "workers", "servers", "world", "observer", "evaluator", "config",
       "format"]
WORKER = ["model", "optimizer", "step", "algorithm", "jitter", "torch_rng", "loss_sum",
          "loss_count", "bytes_by_verb"]
CONFIG = ["algorithm", "hyperparameters", "workers", "steps", "lr", "seed", "checkpoint_every",
          "model", "eval_every", "stragglers"]


def _at(place: str, key: str, value: Any) -> Mutation:
    def damage(saved: dict[str, Any]) -> None:
        target = {"top": saved, "worker": saved["workers"][-1], "config": saved["config"],
                  "evaluator": saved["evaluator"]}[place]
        if value == "<delete>":
            target.pop(key, None)
        else:
            target[key] = value
    return damage


fields = st.one_of(
    st.tuples(st.just("top"), st.sampled_from(TOP)),
    st.tuples(st.just("worker"), st.sampled_from(WORKER)),
    st.tuples(st.just("config"), st.sampled_from(CONFIG)),
    st.tuples(st.just("evaluator"), st.sampled_from(["loss_sum", "loss_count", "real_time_s"])),
)


# Derandomised for CI; the examples are resumes whose checks fail before any training, so 60
# of them take a few seconds (an accepted one trains the last 4 steps).
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(field=fields, value=st.one_of(values, st.just("<delete>")))
@example(field=("top", "step"), value="forty")  # the cases
@example(field=("top", "evaluator"), value=None)
def test_any_crafted_checkpoint_resumes_or_fails_in_one_line(
    field: tuple[str, str], value: Any, stopped: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = _craft(stopped, tmp_path, checkpoint=_at(*field, value))
    before = _files(run)
    code = cli.main(["train", "--resume", str(run), "--no-progress"])
    err = capsys.readouterr().err
    if code == 0:
        assert err == "" and (run / "summary.json").is_file()
        return
    assert code == cli.EXIT_FAILED and "Traceback" not in err, err
    assert err.startswith("distsgd: run failed: ") and err.count("\n") == 1, err
    assert _files(run) == before


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([*CONFIG, "out", "bogus", "backend", "timeout", "links"]),
       value=values)
@example(key="hyperparameters", value=5)  # the case: a report traceback before
@example(key="workers", value="four")
def test_any_crafted_config_json_is_refused_in_one_line_by_resume_and_report(
    key: str, value: Any, stopped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = value.tolist() if isinstance(value, torch.Tensor) else value

    def damage(config: dict[str, Any]) -> dict[str, Any]:
        return {**config, key: plain}

    run = _craft(stopped, tmp_path, config=damage)
    before = _files(run)
    original = json.loads((stopped / "config.json").read_text())
    started: list[Any] = []

    def start(*args: Any) -> runtime.RunResult:  # stands in for the resumed run
        started.append(args)
        return runtime.RunResult(run, {}, [], stopped_at=4)

    monkeypatch.setattr(runtime, "_start", start)
    code = cli.main(["train", "--resume", str(run), "--no-progress"])
    err = capsys.readouterr().err
    if code == 0:  # the same run: a neutral option (where it was written), or the same value
        assert started and (key == "out" or json.dumps(original.get(key)) == json.dumps(plain))
    else:
        assert code == cli.EXIT_FAILED and err.count("\n") == 1 and not started, err
        assert _files(run) == before
    report = tmp_path / "report"
    shutil.rmtree(report, ignore_errors=True)
    # Reading the folder is what is tested here; drawing its plots would take a second each.
    monkeypatch.setattr(distsgd.report, "write_plots", lambda runs, out: [])
    code = cli.main(["report", str(run), "--out", str(report)])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        assert err.startswith("distsgd: error: report: ") and err.count("\n") == 1, err
        assert not report.exists()
