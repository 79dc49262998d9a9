"""`distsgd compare`: tiny grids in the simulator (4 steps of an MLP on 2 workers per cell)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from distsgd import algorithms, cli, compare, runtime
from distsgd.config import RunConfig
from distsgd.errors import UsageError

pytestmark = pytest.mark.timeout(60)

CHOICES = ", ".join(sorted(algorithms.REGISTRY))  # every algorithm, in the order errors list them
TINY = {"steps": 4, "model": "mlp", "eval_every": 2}
TINY_FLAGS = ["--steps", "4", "--model", "mlp", "--option", "eval_every=2", "--workers", "2"]

GRID_TOML = """\
description = "a tiny grid"
[run]
steps = 4
model = "mlp"
eval_every = 2
[grid]
algorithm = ["local-sgd", "sgp"]
workers = 2
seed = [0, 1]
[grid.hyperparameters]
period = [1, 2]
"""


class Runs:
    """Counts the runs that really happen, by cell folder."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started: list[str] = []
        real = runtime.run

        def counted(cfg: RunConfig) -> runtime.RunResult:
            self.started.append(Path(str(cfg.out)).name)
            return real(cfg)

        monkeypatch.setattr(runtime, "run", counted)


def _summary(cell: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((cell / "summary.json").read_text())
    return summary


def test_cells_collapse_axes_an_algorithm_lacks(tmp_path: Path) -> None:
    spec = compare.GridSpec.from_dict(compare.override(
        {"grid": {"algorithm": ["downpour", "sgp", "eamsgd"], "seed": [0, 1],
                  "hyperparameters": {"period": [1, 4], "eamsgd": {"period": [8], "beta": 0.5}}},
         "run": TINY}, workers="2"))
    names = [c.name for c in spec.cells(tmp_path)]
    assert names == [
        "downpour-w2-period=1-seed0", "downpour-w2-period=1-seed1",
        "downpour-w2-period=4-seed0", "downpour-w2-period=4-seed1",
        "sgp-w2-seed0", "sgp-w2-seed1",  # sgp has no period: one cell per seed
        "eamsgd-w2-period=8-beta=0.5-seed0", "eamsgd-w2-period=8-beta=0.5-seed1",
    ]
    cell = spec.cells(tmp_path)[-1]
    assert cell.path == tmp_path / cell.name and cell.config.out == str(cell.path)
    assert cell.config.to_json()["hyperparameters"]["beta"] == 0.5 and cell.config.steps == 4


def test_flags_replace_the_file_and_other_options_become_axes(tmp_path: Path) -> None:
    doc = compare.override(
        {"run": {"epochs": 2.0, "dataset": "digits"},
         "grid": {"algorithm": "sgp", "batch_size": [16, 32], "hyperparameters": {"period": 8}}},
        algorithm="local-sgd,crossover", seed="3", settings=["period=2,4", "crossover.fair=false"],
        options={"steps": 4, "lr": "0.1", "model": "mlp", "stragglers": "[[0, 2]]"})
    cells = compare.GridSpec.from_dict(doc).cells(tmp_path)
    assert [c.name for c in cells] == [
        "local-sgd-w4-batch_size=16-period=2-seed3", "local-sgd-w4-batch_size=16-period=4-seed3",
        "local-sgd-w4-batch_size=32-period=2-seed3", "local-sgd-w4-batch_size=32-period=4-seed3",
        "crossover-w4-batch_size=16-fair=false-seed3",
        "crossover-w4-batch_size=32-fair=false-seed3",
    ]
    cfg = cells[0].config
    assert (cfg.steps, cfg.epochs, cfg.lr, cfg.model) == (4, None, 0.1, "mlp")
    assert cfg.stragglers == ((0, 2.0),)
    assert cells[-1].config.to_json()["hyperparameters"]["fair"] is False


SUB_GRIDS_TOML = """\
[run]
steps = 4
model = "mlp"
[[grid]]
algorithm = ["sgp", "crossover"]
workers = 2
batch_size = 16
[grid.hyperparameters.crossover]
fair = [true, false]
[[grid]]
algorithm = "crossover"
workers = [2, 4]
batch_size = 16
lr = 0.2
[[grid]]
algorithm = ["crossover"]
workers = 2
batch_size = 16
[grid.hyperparameters]
fair = true
"""


def test_sub_grids_are_united_and_a_cell_they_share_is_one(tmp_path: Path) -> None:
    import tomllib

    doc = tomllib.loads(SUB_GRIDS_TOML)
    cells = compare.GridSpec.from_dict(doc).cells(tmp_path)
    assert [c.name for c in cells] == [
        "sgp-w2-batch_size=16-seed0",
        "crossover-w2-batch_size=16-fair=true-seed0",  # also the third sub-grid's only cell
        "crossover-w2-batch_size=16-fair=false-seed0",
        "crossover-w2-batch_size=16-lr=0.2-seed0", "crossover-w4-batch_size=16-lr=0.2-seed0",
    ]
    assert [c.config.lr for c in cells] == [None, None, None, 0.2, 0.2]  # a run option per part
    # Flags replace their entry in every sub-grid.
    flagged = compare.GridSpec.from_dict(compare.override(doc, workers="8", seed="1"))
    assert {(c.config.workers, c.config.seed) for c in flagged.cells(tmp_path)} == {(8, 1)}
    assert len(flagged.cells(tmp_path)) == 4  # w2 and w4 of the lr=0.2 part are one now


EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.toml"))


def test_the_reproduction_suite_has_one_file_per_claim() -> None:
    assert [p.name[:2] for p in EXPERIMENTS] == [f"{n}-" for n in range(1, 10)]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_builds_a_valid_grid(path: Path, tmp_path: Path) -> None:
    doc = compare.load(path)
    cells = compare.GridSpec.from_dict(doc).cells(tmp_path)  # builds and checks every config
    assert cells and all(c.config.backend == "sim" for c in cells)
    assert compare.report_targets(doc), "a claim needs its target in [report]"
    # The file's comment holds the command that ran it, as docs/results.md quotes it.
    command = f"distsgd compare experiments/{path.name} --out runs/exp/{path.stem}"
    assert command in path.read_text()


def test_runs_a_2x2_grid_and_writes_every_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "grid"
    code = cli.main(["compare", "-a", "local-sgd,downpour", "--set", "period=1,2", *TINY_FLAGS,
                     "--out", str(out), "--no-progress"])
    assert code == 0
    names = ["local-sgd-w2-period=1-seed0", "local-sgd-w2-period=2-seed0",
             "downpour-w2-period=1-seed0", "downpour-w2-period=2-seed0"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "grid.json"])
    for name in names:
        summary = _summary(out / name)
        assert summary["steps"] == 4 and summary["workers"] == 2
        assert summary["algorithm"] == name.split("-w")[0]
        assert summary["hyperparameters"]["period"] == int(name[name.index("period=") + 7])
        assert [r["step"] for r in map(json.loads, (out / name / "metrics.jsonl").open())] == [
            0, 2, 4]
    ledger = json.loads((out / "grid.json").read_text())
    assert [c["name"] for c in ledger["cells"]] == names
    assert {c["status"] for c in ledger["cells"]} == {"finished"}
    assert ledger["cells"][0]["hyperparameters"] == {"period": 1}

    printed = capsys.readouterr()
    table = printed.out.splitlines()
    assert table[0].split() == ["algorithm", "workers", "settings", "seed", "test", "acc",
                                "virtual", "s", "MB", "sent"]
    assert table[3].split()[:4] == ["downpour", "2", "period=1", "0"]
    assert table[3].split()[4] == f"{_summary(out / names[2])['test_accuracy']:.4f}"
    assert "[4/4] done: downpour-w2-period=2-seed0" in printed.err


def test_resume_reruns_only_incomplete_or_outdated_cells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec_file, out = tmp_path / "grid.toml", tmp_path / "out"
    spec_file.write_text(GRID_TOML)
    runs = Runs(monkeypatch)
    assert cli.main(["compare", str(spec_file), "--out", str(out), "--no-progress"]) == 0
    assert len(runs.started) == 6  # local-sgd × 2 periods × 2 seeds, sgp × 2 seeds
    mtimes = {p.name: (p / "summary.json").stat().st_mtime_ns for p in out.iterdir() if p.is_dir()}

    interrupted, outdated = out / "local-sgd-w2-period=2-seed1", out / "sgp-w2-seed0"
    (interrupted / "summary.json").unlink()
    config = json.loads((outdated / "config.json").read_text())
    (outdated / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
    runs.started.clear()
    assert compare.run_grid(compare.load(spec_file), out, display=compare.Display(io.StringIO()))
    assert sorted(runs.started) == sorted([interrupted.name, outdated.name])
    for name, mtime in mtimes.items():
        same = (out / name / "summary.json").stat().st_mtime_ns == mtime
        assert same == (name not in runs.started)
    assert json.loads((outdated / "config.json").read_text())["lr"] == config["lr"]

    runs.started.clear()
    results = compare.run_grid(compare.load(spec_file), out, display=compare.Display(io.StringIO()))
    assert runs.started == [] and {r.status for r in results} == {"reused"}
    assert [r.summary for r in results] == [_summary(r.cell.path) for r in results]


@pytest.mark.parametrize("toml, message", [
    ("[runs]\nsteps = 4",
     "unknown key 'runs' in the grid file; valid keys: description, grid, report, run"),
    ("[[grid]]\nalgorithm = 'sgp'\n[[grid]]\nworkers = 2",
     "[[grid]] number 2: grid.algorithm is missing"),
    ("grid = [1, 2]", "grid must be a table ([grid]) or a list of tables ([[grid]])"),
    ("[report]\ntarget_acc = 0.9\n[grid]\nalgorithm = 'sgp'",
     "unknown key 'target_acc' in [report]; valid keys: target_accuracy, target_loss"),
    ("[report]\ntarget_accuracy = 1.5\n[grid]\nalgorithm = 'sgp'",
     "report.target_accuracy=1.5 is out of range"),
    ("[report]\ntarget_loss = 'low'\n[grid]\nalgorithm = 'sgp'",
     "report.target_loss='low' is not a valid float"),
    ("[run]\nstepz = 4\n[grid]\nalgorithm = 'sgp'", "unknown key 'stepz' in [run]; valid keys: "),
    ("[grid]\nalgorithm = 'sgp'\nworkers = 'four'", "grid.workers='four' is not a valid int"),
    ("[grid]\nalgorithm = 'sgp'\nworkers = [2, 2]", "grid.workers lists 2 twice"),
    ("[run]\nsteps = 2.5\n[grid]\nalgorithm = 'sgp'", "run.steps=2.5 is not a valid int"),
    ("[run]\nworkers = 2\n[grid]\nalgorithm = 'sgp'", "workers is an axis: put it in [grid]"),
    ("[run]\nsteps = 2\n[grid]\nalgorithm = 'sgp'\nsteps = [4]", "steps is both in [run] and"),
    ("[grid]\nalgorithm = ['sgp', 'sdg']", "unknown algorithm 'sdg' (did you mean 'sgp'?); "
                                           f"valid choices: {CHOICES}\n"),
    ("[grid]\nworkers = 2", "grid.algorithm is missing"),
    ("[grid]\nalgorithm = ['sgp', 'easgd']\n[grid.hyperparameters]\nperod = [1]",
     "no algorithm of the grid (sgp, easgd) has hyperparameter 'perod'; valid hyperparameters: "
     "alpha, beta, overlap, peers, period, synch_freq"),
    ("[grid]\nalgorithm = ['sgp']\n[grid.hyperparameters.sgp]\nperiod = [1]",
     "unknown key 'period' in [grid.hyperparameters.sgp] (sgp's hyperparameters); valid keys: "
     "overlap, peers, synch_freq"),
    ("[grid]\nalgorithm = ['sgp']\n[grid.hyperparameters.easgd]\nperiod = [1]",
     "easgd is not in grid.algorithm; valid choices: sgp"),
    ("[grid]\nalgorithm = 'easgd'\n[grid.hyperparameters]\nperiod = [1.5]",
     "easgd: period=1.5 is not a valid int"),
    ("[grid]\nalgorithm = 'easgd'\n[grid.hyperparameters]\nperiod = [2, 0]",
     "cell easgd-w4-period=0-seed0: easgd: period=0 is out of range"),
    ("[grid]\nalgorithm = 'sgp'\nbackend = 'torchrun'", "cannot run a grid; valid choices: sim"),
    ("[grid]\nalgorithm = 'sgp'\nworkers = 2 3", "is not valid TOML"),
])
def test_a_bad_grid_file_exits_2_with_one_line_and_runs_nothing(
    toml: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = Runs(monkeypatch)
    spec_file, out = tmp_path / "grid.toml", tmp_path / "out"
    spec_file.write_text(toml)
    code = cli.main(["compare", str(spec_file), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("distsgd: error: ")
    assert runs.started == [] and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["-a", "sgp", "--jobs", "0"], "jobs=0 is out of range"),
    (["-a", "sgp", "--workers", "2,x"], "--workers '2,x' is not a list of ints"),
    (["-a", "sgp,", "--steps", "2"], "--algorithm 'sgp,' has an empty item"),
    (["-a", "sgp", "--set", "peers"], "--set 'peers' is not [ALGORITHM.]NAME=VALUE"),
    (["-a", "sgp", "--option", "workers=2"], "workers is an axis"),
    (["-a", "sgp", "--option", "lr=fast"], "run.lr='fast' is not a valid float"),
    (["-a", "sgp", "--backend", "torchrun"], "invalid choice: 'torchrun'"),
    (["{tmp}/missing.toml"], "cannot read grid file"),
])
def test_bad_flags_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["compare", *argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_failing_cell_is_named_and_the_others_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # A learning rate of 1000 makes that cell diverge while it runs: only a run can find it.
    out = tmp_path / "grid.toml"
    out.write_text('[run]\nsteps = 4\nmodel = "mlp"\ndataset = "synthetic"\n'
                   '[grid]\nalgorithm = ["sgp"]\nworkers = [2]\nlr = [1000.0, 0.05]\n')
    out = tmp_path / "out"
    code = cli.main(["compare", str(tmp_path / "grid.toml"), "--steps", "20", "--out", str(out),
                     "--no-progress"])
    printed = capsys.readouterr()
    assert code == 1
    failed, good = out / "sgp-w2-lr=1000.0-seed0", out / "sgp-w2-lr=0.05-seed0"
    error = "worker 0 diverged: loss nan at step"
    assert f"failed: {failed.name}: {error}" in printed.out
    assert f"FAILED: {failed.name}  {error}" in printed.err
    assert "DivergenceError" in (failed / "error.txt").read_text()
    assert not (failed / "summary.json").exists() and _summary(good)["steps"] == 20
    ledger = {c["name"]: c for c in json.loads((out / "grid.json").read_text())["cells"]}
    assert ledger[failed.name]["status"] == "failed"
    assert ledger[failed.name]["error"].startswith(error)
    assert ledger[good.name]["status"] == "finished"


def test_an_unexpected_exception_fails_its_cell_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = runtime.run

    def flaky(cfg: RunConfig) -> runtime.RunResult:
        if cfg.seed == 0:
            raise RuntimeError("disk full")
        return real(cfg)

    monkeypatch.setattr(runtime, "run", flaky)
    spec = {"run": TINY, "grid": {"algorithm": "allreduce", "workers": 2, "seed": [0, 1]}}
    results = compare.run_grid(spec, tmp_path, display=compare.Display(io.StringIO()))
    assert [(r.status, r.error) for r in results] == [("failed", "RuntimeError: disk full"),
                                                      ("ran", None)]
    assert results[1].summary == _summary(tmp_path / "allreduce-w2-seed1")
    assert "failed: allreduce-w2-seed0: RuntimeError: disk full" in compare.format_table(results)


@pytest.mark.timeout(120)
def test_parallel_cells_give_the_same_summaries(tmp_path: Path) -> None:
    spec = {"run": TINY, "grid": {"algorithm": ["downpour", "sgp"], "workers": 2,
                                  "seed": [0, 1]}}
    one = compare.run_grid(spec, tmp_path / "one", jobs=1, display=compare.Display(io.StringIO()))
    two = compare.run_grid(spec, tmp_path / "two", jobs=2, display=compare.Display(io.StringIO()))

    def timeless(results: list[compare.CellResult]) -> list[dict[str, Any]]:
        return [{k: v for k, v in (r.summary or {}).items()
                 if k not in ("real_time_s", "startup_s")} for r in results]

    assert [r.status for r in two] == ["ran"] * 4
    assert timeless(one) == timeless(two)
    assert [_summary(r.cell.path) for r in two] == [r.summary for r in two]


def test_the_live_line_shows_running_cells(tmp_path: Path) -> None:
    spec = compare.GridSpec.from_dict({"run": TINY, "grid": {"algorithm": "sgp", "seed": [0, 1]}})
    first, second = spec.cells(tmp_path)
    first.path.mkdir()
    (first.path / "metrics.jsonl").write_text(json.dumps({"step": 2, "test_accuracy": 0.5}) + "\n")
    stream = io.StringIO()
    display = compare.Display(stream, live=True)
    display.begin(tmp_path, 2, 0, 2)
    display.running([first, second])
    assert stream.getvalue().endswith(
        "\r\x1b[K[0/2] sgp-w4-seed0 step 2/4 acc 0.500 0.0 MB | sgp-w4-seed1 starting")
    display.close()
    assert stream.getvalue().endswith("\r\x1b[K")


def test_run_grid_checks_jobs(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="jobs=0 is out of range"):
        compare.run_grid({"grid": {"algorithm": "sgp"}}, tmp_path, jobs=0)
