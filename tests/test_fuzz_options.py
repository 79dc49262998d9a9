"""Property-based: whatever options arrive — command line, Python API, grid file — the result is a
valid configuration or one `UsageError` (exit status 2, one line), never a traceback or a hang.

Nothing here trains: the run itself is replaced by a stub once the options are accepted.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distsgd import algorithms, cli, cli_args, compare, config, runtime
from distsgd.config import RunConfig
from distsgd.errors import UsageError

pytestmark = pytest.mark.timeout(300)
FIELDS = [f.name for f in dataclasses.fields(RunConfig)]
HYPERPARAMETERS = sorted({f.name for cls in algorithms.REGISTRY.values()
                          for f in dataclasses.fields(cls)})

# Values of every kind, including the awkward ones: NaN, infinities, negatives, huge numbers,
# empty and odd strings, containers where scalars belong.
values = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "sgp", "digits", "none", "inf", "nan", "-1", "0", "1e9", "flops",
                     "flops:0", "measured", "lognormal:-1", "lognormal:x", "stop", "skip",
                     "blocks", "momentum"]),
    st.text(max_size=8),
    st.lists(st.integers(-2, 9), max_size=3),
    st.tuples(st.integers(-2, 9), st.floats(allow_nan=True)),
)


def _accepted(cfg: RunConfig) -> runtime.RunResult:
    raise AssertionError("a stub stands in for the run")


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(options=st.dictionaries(st.sampled_from([*FIELDS, "bogus"]), values, max_size=4),
       hyper=st.dictionaries(st.sampled_from([*HYPERPARAMETERS, "bogus"]), values, max_size=2))
def test_python_api_options_are_valid_or_a_usage_error(options: dict[str, Any],
                                                       hyper: dict[str, Any]) -> None:
    if hyper:
        options["hyperparameters"] = hyper
    try:
        cfg = RunConfig.create(**options)
    except UsageError as e:
        assert str(e) and "\n" not in str(e)
        return
    cfg.check()  # an accepted config stays valid
    assert cfg.make_algorithm().name == cfg.algorithm
    _assert_bounded(cfg)


def _assert_bounded(cfg: RunConfig) -> None:
    """Every number an accepted config holds is finite and within the run's bounds (SSP's s may
    be inf: fully asynchronous)."""
    numbers = [v for f in dataclasses.fields(cfg) for v in _leaves(getattr(cfg, f.name))]
    numbers += [v for k, v in dataclasses.asdict(cfg.make_algorithm()).items()
                if not (cfg.algorithm == "ssp" and k == "s")]
    for value in numbers:
        if isinstance(value, float):
            assert math.isfinite(value), cfg
    for name in ("steps", "eval_every", "checkpoint_every", "stop_after"):
        assert getattr(cfg, name) is None or getattr(cfg, name) <= config.MAX_STEPS
    assert cfg.timeout <= config.MAX_SECONDS and cfg.workers <= config.MAX_WORKERS
    assert 0 <= cfg.seed <= config.MAX_SEED


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


FLAGS = ["--algorithm", "--workers", "--backend", "--dataset", "--model", "--steps", "--epochs",
         "--batch-size", "--lr", "--momentum", "--weight-decay", "--seed", "--eval-every",
         "--sampling", "--compute-time", "--straggler", "--slowdown", "--on-divergence",
         "--link", "--latency", "--bandwidth", "--timeout", "--set", "--on-failure",
         "--checkpoint-every", "--stop-after"]  # --resume reads folders: tests/test_checkpoint.py
words = st.one_of(
    st.sampled_from(["0", "1", "-1", "2", "3", "0.5", "nan", "inf", "-inf", "1e400", "",
                     "sgp", "ssp", "crossover", "digits", "mlp", "cnn", "sim", "processes",
                     "period=0", "period=3", "s=inf", "peers=9", "groups=2", "p=1.5",
                     "3:4", "3:x", "0:1:1e-3:1e6", "0:1", "fair=maybe", "=", "a=b=c", "continue",
                     "stop", "gosgd"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6),
)


# The fixtures are safe to share across examples: the stub is set again each time and the
# captured output is read (and so emptied) each time.
@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.one_of(st.sampled_from(FLAGS), words), max_size=8))
def test_command_line_exits_0_or_2_never_a_traceback(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    accepted: list[RunConfig] = []

    def stub(cfg: RunConfig) -> runtime.RunResult:
        accepted.append(cfg)
        return runtime.RunResult(out=__import__("pathlib").Path("."), summary={}, metrics=[])

    monkeypatch.setattr(runtime, "run", stub)
    code = cli.main(["train", *argv, "--no-progress"])
    err = capsys.readouterr().err
    if code == 2:
        assert err.startswith("distsgd: error: ") and err.count("\n") == 1
    else:
        assert code == 0 and len(accepted) == 1 and err == ""
        accepted[0].check()
        _assert_bounded(accepted[0])


grid_values = st.one_of(values, st.lists(values, max_size=3))


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(run=st.dictionaries(st.sampled_from([*FIELDS, "bogus"]), values, max_size=3),
       grid=st.dictionaries(st.sampled_from(["algorithm", "workers", "seed", "lr", "bogus",
                                             "hyperparameters"]), grid_values, max_size=3))
def test_grid_files_are_valid_or_a_usage_error(run: dict[str, Any],
                                               grid: dict[str, Any]) -> None:
    doc: dict[str, Any] = {"run": run, "grid": {"algorithm": ["sgp"], **grid}}
    try:
        cells = compare.GridSpec.from_dict(doc).cells(__import__("pathlib").Path("unused"))
    except UsageError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert cells and all(isinstance(c.config, RunConfig) for c in cells)
    for cell in cells:
        _assert_bounded(cell.config)


# ----------------------------------------------------------------------- unbounded inputs
@pytest.mark.parametrize(("argv", "words"), [
    (["--steps", "100000000000", "--eval-every", "1"], "steps=100000000000 is out of range: "
                                                       "valid values lie in [1, 1000000000]"),
    (["--steps", "1" + "0" * 400], "steps=1000"),  # was an OverflowError traceback
    (["--eval-every", "100000000000"], "eval_every=100000000000 is out of range"),
    (["--checkpoint-every", "100000000000"], "checkpoint_every=100000000000 is out of range"),
    (["--timeout", "1e308"], "timeout=1e+308 is out of range: valid values lie in (0, 1000000]"),
    (["--epochs", "1e300"], "epochs=1e+300 is out of range"),
    (["--lr", "inf"], "lr=inf is out of range: valid finite values lie in [0, inf)"),
    (["--weight-decay", "inf"], "weight_decay=inf is out of range"),
    (["--bandwidth", "inf"], "bandwidth=inf is out of range"),
    (["--latency", "1e300"], "latency=1e+300 is out of range"),
    (["--workers", "100000000"], "workers=100000000 is out of range"),
    (["--batch-size", "10000000000"], "batch_size=10000000000 is out of range"),
    (["--seed", "-1"], "seed=-1 is out of range"),
    (["--seed", str(2**64)], "seed=18446744073709551616 is out of range"),
    (["--compute-time", "inf"], "compute_time=inf is out of range"),
    (["--compute-time", "flops:inf"], "compute_time flops rate=inf is out of range"),
    (["--slowdown", "lognormal:inf"], "slowdown sigma=inf is out of range"),
    (["--straggler", "0:inf"], "straggler factor=inf is out of range"),
    (["--link", "0:1:1e300:1e6"], "link latency=1e+300 is out of range"),
    (["-a", "easgd", "--set", "beta=inf"], "easgd: beta=inf is out of range"),
    (["-a", "easgd", "--set", "alpha=nan"], "easgd: alpha=nan is out of range"),
])
def test_numbers_out_of_bounds_exit_2_naming_the_range(
    argv: list[str], words: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(runtime, "run", _accepted)  # nothing may start
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distsgd: error: ") and words in err and err.count("\n") == 1, err


def test_ssp_keeps_an_infinite_staleness_bound() -> None:
    ssp = RunConfig.create(algorithm="ssp", hyperparameters={"s": math.inf}).make_algorithm()
    assert getattr(ssp, "s") == math.inf  # noqa: B009 (an attribute of SSP only)


def test_a_grid_with_an_infinite_lr_is_refused(tmp_path: Path) -> None:
    doc = {"run": {"steps": 5, "lr": math.inf}, "grid": {"algorithm": ["sgp"]}}
    with pytest.raises(UsageError, match="lr=inf is out of range"):
        compare.GridSpec.from_dict(doc).cells(tmp_path)


def test_a_run_too_long_by_its_epochs_is_refused() -> None:
    cfg = RunConfig.create(epochs=1e6, batch_size=1, workers=1)
    with pytest.raises(UsageError, match=r"make \d+ steps per worker: valid runs take "
                                         r"\[1, 1000000000\] steps"):
        cfg.check_length(cfg.total_steps(__import__("distsgd").data.load("digits")))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(total=st.integers(1, 200), every=st.one_of(st.none(), st.integers(1, 250)),
       checkpoint=st.integers(0, 250), step=st.integers(-3, 260))
def test_schedules_are_the_steps_they_always_were(total: int, every: int | None,
                                                  checkpoint: int, step: int) -> None:
    cfg = RunConfig(eval_every=every, checkpoint_every=checkpoint)
    period = every or max(1, total // 10)
    old_evals = {0, total, *range(period, total, period)}  # the sets they replace
    old_checkpoints = set(range(checkpoint, total, checkpoint)) if checkpoint else set()
    for schedule, old in ((config.eval_steps(cfg, total), old_evals),
                          (config.checkpoint_steps(cfg, total), old_checkpoints)):
        assert (step in schedule) == (step in old)
        assert schedule.after(step) == min((s for s in old if s > step), default=None)


def test_schedules_are_not_materialised() -> None:
    # A run of 10^9 steps evaluated at each used to build a set of 10^9 numbers (MemoryError).
    cfg = RunConfig(eval_every=1, checkpoint_every=1)
    for schedule in (config.eval_steps(cfg, 10**6), config.checkpoint_steps(cfg, 10**6)):
        assert sys.getsizeof(schedule) < 1000
        assert 999_999 in schedule and 10**6 + 1 not in schedule


# ------------------------------------------------------------------- help and mistyped names
def test_train_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    train = cli_args.build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore
    formatter = train._get_formatter()
    for action in train._actions:
        if action.dest != "help":
            assert "default" in formatter._expand_help(action), action.option_strings
    for shown in ("(default 0.9)", "(default 32)", "(default 0)", "(default 120)",
                  "(default shard)", "(default 2.5e-05)"):
        assert shown in text


@pytest.mark.parametrize(("argv", "suggestion"), [
    (["train", "--stesp", "3"], "(did you mean '--steps'?)"),
    (["train", "--algorithm", "allreduse"], "(did you mean 'allreduce'?)"),
    (["train", "--dataset", "digit"], "(did you mean 'digits'?)"),
    (["train", "--model", "resnet"], "(did you mean 'resnet20'?)"),
    (["train", "--backend", "processs"], "(did you mean 'processes'?)"),
    (["train", "-a", "easgd", "--set", "perod=3"], "(did you mean 'period'?)"),
    (["trian"], "(did you mean 'train'?)"),
    (["compare", "-a", "gossgd"], "(did you mean 'gosgd'?)"),
    (["project", "-a", "powersdg"], "(did you mean 'powersgd'?)"),
])
def test_a_mistyped_name_gets_a_suggestion(argv: list[str], suggestion: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert suggestion in err and err.count("\n") == 1, err


def test_an_option_name_gets_a_suggestion_from_python() -> None:
    with pytest.raises(UsageError, match=r"unknown option 'batchsize' \(did you mean "
                                         r"'batch_size'\?\)"):
        RunConfig.create(batchsize=3)
