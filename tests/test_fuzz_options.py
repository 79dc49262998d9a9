"""Property-based: whatever options arrive — command line, Python API, grid file — the result is a
valid configuration or one `UsageError` (exit status 2, one line), never a traceback or a hang.

Nothing here trains: the run itself is replaced by a stub once the options are accepted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distsgd import algorithms, cli, compare, runtime
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
