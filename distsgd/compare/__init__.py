"""`distsgd compare`: a grid of training runs, each cell a normal run folder under one parent.

The grid file is TOML::

    description = "EASGD, the communication period"   # optional, kept in grid.json

    [run]                    # fixed options of every cell: any RunConfig field (distsgd/train.py)
    dataset = "digits"       # except the grid's own keys below and out/progress, which compare sets
    model = "mlp"
    steps = 100

    [grid]                   # the axes: each a list, or one value
    algorithm = ["downpour", "eamsgd"]   # required
    workers = [4, 8]                     # default 4
    seed = [0, 1]                        # default 0
    batch_size = [16, 64]                # any other RunConfig field may be an axis too

    [grid.hyperparameters]               # for every algorithm of the grid that has them
    period = [1, 4, 16]
    [grid.hyperparameters.eamsgd]        # for eamsgd only; replaces a shared list of that name
    beta = [0.5, 0.9]

`[[grid]]` instead of `[grid]` gives several sub-grids over the same [run] options, each a
table as above; the cells are their union (a cell two sub-grids share runs once). It says what a
product cannot: a global batch held fixed as the workers grow, or a run option for one algorithm
only::

    [[grid]]
    algorithm = "sgp"
    workers = 8
    batch_size = 64
    [[grid]]
    algorithm = "sgp"
    workers = 16
    batch_size = 32

An optional `[report]` table names what `distsgd report` measures on the grid's runs, besides its
usual table: ``target_accuracy = 0.85`` (first evaluation with test accuracy at least this) and
``target_loss = 0.5`` (first with test loss at most this: the evaluated model's, not the noisy
mini-batch loss) add the steps and the virtual and real seconds each run took to get there.

The cells of an algorithm are the product of workers × the other [grid] axes × its hyperparameter
lists × seeds. A shared hyperparameter applies to the algorithms that have it; for one that lacks
it the axis collapses (`period = [1, 4]` over downpour and sgp gives two downpour cells and one sgp
cell) rather than failing, so one grid can compare algorithms with different knobs. A value is
typed as TOML (`workers = "four"` is an error); a hyperparameter may also be text, as with `--set`
(`alpha = "none"`).

An unknown key, algorithm or hyperparameter (one no algorithm of the grid has, or one its
per-algorithm table's algorithm lacks), a wrong type or an out-of-range value raises `UsageError`
before any cell runs: every cell's `RunConfig` is built and checked first. What only a run can
check (e.g. crossover's `groups` against the workers) fails that cell alone; the others go on.

The output::

    OUT/grid.json                         the spec and every cell: coordinates, status, error
    OUT/downpour-w4-period=4-seed0/       a run folder (config.json, metrics.jsonl, summary.json)

A cell's name holds its algorithm, `w` workers, every other [grid] key and `seed`, so names stay
put when a list grows. Running again into the same OUT resumes: a cell whose folder holds a
summary.json and a config.json equal to the cell's config is not rerun; any other folder of that
name (interrupted, failed, or made with other options) is deleted and the cell runs from scratch.

    >>> results = run_grid({"run": {"steps": 20}, "grid": {"algorithm": ["sgp", "allreduce"]}},
    ...                    "runs/demo", jobs=2)
    >>> print(format_table(results))
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import itertools
import json
import multiprocessing
import re
import shutil
import sys
import time
import tomllib
import traceback
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from distsgd import algorithms, runtime
from distsgd.algorithms.base import type_hints
from distsgd.config import RunConfig
from distsgd.errors import DistSGDError, UsageError, check_range
from distsgd.metrics import unique_path, write_json

AXES = ("algorithm", "workers", "seed")  # coordinates of every cell, always in its name
OWN = ("hyperparameters", "out", "progress")  # RunConfig fields compare fills itself
BACKENDS = ("sim", "processes")  # torchrun starts one run, not a grid
_BAD = object()  # `_convert`'s "no such value of that type"


# ------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class GridSpec:
    """A checked grid (see the module docstring); `cells` expands it."""

    algorithms: tuple[str, ...]
    axes: dict[str, tuple[Any, ...]]  # RunConfig fields that vary: workers, seed, any other
    hyperparameters: dict[str, tuple[Any, ...]]  # shared by the algorithms that have them
    per_algorithm: dict[str, dict[str, tuple[Any, ...]]]
    run: dict[str, Any]  # fixed RunConfig options
    description: str = ""
    source: dict[str, Any] = field(default_factory=dict)  # the document, kept in grid.json
    parts: tuple[GridSpec, ...] = ()  # the sub-grids of a [[grid]] file (then the axes are empty)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> GridSpec:
        """Check a document shaped like the TOML file; `UsageError` names the first bad key."""
        _known("the grid file", doc, ("description", "run", "grid", "report"))
        description = doc.get("description", "")
        if not isinstance(description, str):
            raise UsageError(f"description={description!r} is not a valid str")
        report_targets(doc)
        source = copy.deepcopy(dict(doc))
        if not isinstance(doc.get("grid"), list):
            return cls._one(doc, _table(doc, "grid"), description, source)
        if not doc["grid"] or not all(isinstance(g, dict) for g in doc["grid"]):
            raise UsageError("grid must be a table ([grid]) or a list of tables ([[grid]])")
        parts = []
        for number, grid in enumerate(doc["grid"], 1):
            try:
                parts.append(cls._one(doc, grid, description, source))
            except UsageError as e:
                raise UsageError(f"[[grid]] number {number}: {e}") from None
        names = tuple(dict.fromkeys(n for part in parts for n in part.algorithms))
        return cls(names, {}, {}, {}, parts[0].run, description, source, tuple(parts))

    @classmethod
    def _one(cls, doc: Mapping[str, Any], grid: dict[str, Any], description: str,
             source: dict[str, Any]) -> GridSpec:
        if "algorithm" not in grid:
            raise UsageError("grid.algorithm is missing (e.g. algorithm = ['sgp', 'allreduce']); "
                             f"valid choices: {', '.join(sorted(algorithms.REGISTRY))}")
        names = _values("grid.algorithm", grid["algorithm"])
        for name in names:
            algorithms.get(name)
        run, axes = _run_options(_table(doc, "run")), _axes(grid)
        both = sorted(set(run) & set(axes))
        if both:
            raise UsageError(f"{both[0]} is both in [run] and in [grid]; keep one")
        shared, per_algorithm = _hyperparameters(_table(grid, "hyperparameters"), names)
        return cls(names, axes, shared, per_algorithm, run, description, source)

    def hyperparameter_axes(self, algorithm: str) -> dict[str, tuple[Any, ...]]:
        """The hyperparameter lists of `algorithm`: the shared ones it has, then its own."""
        fields = {f.name for f in dataclasses.fields(algorithms.get(algorithm))}
        own = {k: v for k, v in self.hyperparameters.items() if k in fields}
        return {**own, **self.per_algorithm.get(algorithm, {})}

    def cells(self, out: str | Path) -> list[Cell]:
        """Every cell in order, each with its checked config; `UsageError` on the first bad one."""
        if self.parts:
            # A name holds every coordinate, so sub-grids that name a cell alike mean one cell.
            union: dict[str, Cell] = {}
            for part in self.parts:
                for cell in part.cells(out):
                    union.setdefault(cell.name, cell)
            return list(union.values())
        cells = [c for name in self.algorithms for c in self._cells_of(name, Path(out))]
        seen: set[str] = set()
        for cell in cells:
            if cell.name in seen:
                raise UsageError(f"two cells would share the folder {cell.name!r}: list each "
                                 "value once")
            seen.add(cell.name)
        return cells

    def _cells_of(self, algorithm: str, out: Path) -> Iterator[Cell]:
        axes = {"workers": (RunConfig.workers,), "seed": (RunConfig.seed,), **self.axes}
        order = ["workers", *(k for k in axes if k not in ("workers", "seed"))]
        cls = algorithms.get(algorithm)
        hyper = {k: [_hyperparameter(cls, k, v) for v in values]
                 for k, values in self.hyperparameter_axes(algorithm).items()}
        # Seeds vary fastest: the repeats of one setting finish together.
        for *values, seed in itertools.product(*(axes[k] for k in order), *hyper.values(),
                                               axes["seed"]):
            options = {**dict(zip(order, values[:len(order)], strict=True)), "seed": seed}
            chosen = dict(zip(hyper, values[len(order):], strict=True))
            yield self._cell(algorithm, options, chosen, out)

    def _cell(self, algorithm: str, options: dict[str, Any], hyper: dict[str, Any],
              out: Path) -> Cell:
        name = cell_name(algorithm, options, hyper)
        try:
            config = RunConfig.create(**self.run, **options, algorithm=algorithm,
                                      hyperparameters=hyper, out=str(out / name))
        except UsageError as e:
            raise UsageError(f"cell {name}: {e}") from None
        return Cell(name, out / name, config, options, hyper)


@dataclass(frozen=True)
class Cell:
    name: str
    path: Path
    config: RunConfig
    options: dict[str, Any]  # the RunConfig coordinates: workers, seed and any other axis
    hyperparameters: dict[str, Any]  # the grid's values (the algorithm's defaults fill the rest)


def cell_name(algorithm: str, options: Mapping[str, Any], hyper: Mapping[str, Any]) -> str:
    """E.g. ``downpour-w4-period=4-seed0``: readable, and the same for the same coordinates."""
    rest = [(k, v) for k, v in options.items() if k not in ("workers", "seed")]
    parts = [algorithm, f"w{options['workers']}",
             *(f"{k}={_text(v)}" for k, v in [*rest, *hyper.items()]), f"seed{options['seed']}"]
    # Only characters every file system and shell take as they are.
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "+".join(_text(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


TARGETS = ("target_accuracy", "target_loss")  # the keys of [report]


def report_targets(doc: Mapping[str, Any]) -> dict[str, float]:
    """The checked [report] table of a grid document: target_accuracy in (0, 1], target_loss > 0."""
    table = _table(doc, "report")
    _known("[report]", table, TARGETS)
    targets = {k: _typed(f"report.{k}", v, float) for k, v in table.items()}
    if "target_accuracy" in targets:
        check_range("report.target_accuracy", targets["target_accuracy"], 0, 1, low_open=True)
    if "target_loss" in targets:
        check_range("report.target_loss", targets["target_loss"], 0, low_open=True)
    return targets


def _known(where: str, table: Mapping[str, Any], valid: Sequence[str]) -> None:
    unknown = [k for k in table if k not in valid]
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r} in {where}; valid keys: "
                         f"{', '.join(sorted(valid))}")


def _table(doc: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{key} must be a table ([{key}]), not {value!r}")
    return value


def _values(where: str, value: Any) -> tuple[Any, ...]:
    """One axis: a list of distinct values, or one value."""
    values = tuple(value) if isinstance(value, list) else (value,)
    if not values:
        raise UsageError(f"{where} is empty; give at least one value")
    for i, v in enumerate(values):
        if isinstance(v, dict):
            raise UsageError(f"{where} holds a table; give a value or a list of values")
        if v in values[:i]:
            raise UsageError(f"{where} lists {v!r} twice; list each value once")
    return values


def _run_fields() -> dict[str, Any]:
    """The RunConfig fields a grid file may set, with their types."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if f.name not in OWN}


def _run_options(table: Mapping[str, Any]) -> dict[str, Any]:
    fields = _run_fields()
    for key in table:
        if key in AXES:
            raise UsageError(f"{key} is an axis: put it in [grid] (one value or a list)")
        if key in OWN:
            hint = "[grid.hyperparameters]" if key == "hyperparameters" else "the command line"
            raise UsageError(f"{key} cannot be in [run]; set it in {hint}")
    _known("[run]", table, [k for k in fields if k not in AXES])
    run = {k: _typed(f"run.{k}", v, fields[k]) for k, v in table.items()}
    _check_backend("run.backend", run.get("backend", "sim"))
    return run


def _axes(grid: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
    fields = _run_fields()
    _known("[grid]", grid, ["algorithm", "hyperparameters", *fields])
    axes = {}
    for key, value in grid.items():
        if key in ("algorithm", "hyperparameters"):
            continue
        axes[key] = tuple(_typed(f"grid.{key}", v, fields[key])
                          for v in _values(f"grid.{key}", value))
    for backend in axes.get("backend", ()):
        _check_backend("grid.backend", backend)
    return axes


def _check_backend(where: str, backend: str) -> None:
    if backend not in BACKENDS:
        raise UsageError(f"{where}={backend!r} cannot run a grid; valid choices: "
                         f"{', '.join(BACKENDS)}")


def _hyperparameters(table: Mapping[str, Any], names: tuple[str, ...]) -> tuple[
        dict[str, tuple[Any, ...]], dict[str, dict[str, tuple[Any, ...]]]]:
    """Split [grid.hyperparameters] into shared lists and per-algorithm tables, and check both."""
    fields = {n: sorted(f.name for f in dataclasses.fields(algorithms.get(n))) for n in names}
    shared, per_algorithm = {}, {}
    for key, value in table.items():
        if not isinstance(value, dict):
            if not any(key in f for f in fields.values()):
                known = sorted({k for f in fields.values() for k in f})
                raise UsageError(f"no algorithm of the grid ({', '.join(names)}) has "
                                 f"hyperparameter {key!r}; valid hyperparameters: "
                                 f"{', '.join(known) or 'none'}")
            shared[key] = _values(f"grid.hyperparameters.{key}", value)
            continue
        algorithms.get(key)  # an unknown name fails with the valid choices
        if key not in names:
            raise UsageError(f"[grid.hyperparameters.{key}]: {key} is not in grid.algorithm; "
                             f"valid choices: {', '.join(names)}")
        _known(f"[grid.hyperparameters.{key}] ({key}'s hyperparameters)", value, fields[key])
        per_algorithm[key] = {k: _values(f"grid.hyperparameters.{key}.{k}", v)
                              for k, v in value.items()}
    return shared, per_algorithm


def _hyperparameter(cls: type[algorithms.Algorithm], key: str, value: Any) -> Any:
    if isinstance(value, str):  # text, as `--set` gives it (also the only way to write none)
        return algorithms.parse_value(cls, key, value)
    return _typed(f"{cls.name}: {key}", value, type_hints(cls)[key])


def _typed(where: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` declares, or `UsageError` naming `where` and that type."""
    converted = _convert(value, hint)
    if converted is _BAD:
        raise UsageError(f"{where}={value!r} is not a valid {_kind(hint)}")
    return converted


def _convert(value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        return next((c for c in (_convert(value, a) for a in args) if c is not _BAD), _BAD)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            return _BAD
        kinds = [args[0]] * len(value) if args[-1:] == (Ellipsis,) else list(args)
        items = [_convert(v, k) for v, k in zip(value, kinds, strict=False)]
        return tuple(items) if len(kinds) == len(value) and _BAD not in items else _BAD
    if hint is float and type(value) in (int, float):
        return float(value)  # TOML writes 1 for 1.0
    return value if hint in (bool, int, str) and type(value) is hint else _BAD


def _kind(hint: Any) -> str:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        return " or ".join(_kind(a) for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        if args[-1:] == (Ellipsis,):
            return f"list of {_kind(args[0])}"
        return f"[{', '.join(_kind(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


# ------------------------------------------------------------------ file and flags
def load(path: str | Path) -> dict[str, Any]:
    """The TOML document at `path`; `UsageError` when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UsageError(f"cannot read grid file {str(path)!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"grid file {str(path)!r} is not valid TOML: {e}") from None


def override(base: Mapping[str, Any], *, algorithm: str | None = None,
             workers: str | None = None, seed: str | None = None,
             settings: Sequence[str] = (), options: Mapping[str, Any] | None = None,
             ) -> dict[str, Any]:
    """`base` with the command line's entries replacing its own (flags are text: `a,b` lists)."""
    doc = copy.deepcopy(dict(base))
    run = doc["run"] = _table(doc, "run")
    grids = doc["grid"] if isinstance(doc.get("grid"), list) else [_table(doc, "grid")]
    if not isinstance(doc.get("grid"), list):
        doc["grid"] = grids[0]
    for grid in grids:  # a flag replaces its entry in every sub-grid
        if isinstance(grid, dict):
            _override_grid(grid, algorithm, workers, seed, settings)
    for key, value in (options or {}).items():
        if key in ("steps", "epochs"):  # one sets the length of the run, replacing the other
            run.pop("epochs" if key == "steps" else "steps", None)
        for grid in grids:
            if isinstance(grid, dict):
                grid.pop(key, None)
        run[key] = _option(key, value)
        if run[key] is None:
            del run[key]  # none: RunConfig's default
    return doc


def _override_grid(grid: dict[str, Any], algorithm: str | None, workers: str | None,
                   seed: str | None, settings: Sequence[str]) -> None:
    if algorithm is not None:
        grid["algorithm"] = _split("--algorithm", algorithm)
    for key, text in (("workers", workers), ("seed", seed)):
        if text is not None:
            grid[key] = _ints(f"--{key}", text)
    if settings:
        grid["hyperparameters"] = hyper = _table(grid, "hyperparameters")
        for item in settings:
            _set_hyperparameter(hyper, item)


def _split(flag: str, text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise UsageError(f"{flag} {text!r} has an empty item; give values separated by commas")
    return items


def _ints(flag: str, text: str) -> list[int]:
    try:
        return [int(t) for t in _split(flag, text)]
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a list of ints (e.g. {flag} 4,8)") from None


def _set_hyperparameter(table: dict[str, Any], item: str) -> None:
    """--set NAME=V1,V2 (every algorithm that has NAME) or --set ALGORITHM.NAME=V1,V2."""
    name, sep, text = item.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"--set {item!r} is not [ALGORITHM.]NAME=VALUE[,VALUE...] "
                         "(e.g. --set period=1,4)")
    algorithm, _, key = name.strip().rpartition(".")
    target = table.setdefault(algorithm, {}) if algorithm else table
    if not isinstance(target, dict):
        raise UsageError(f"--set {item!r}: {algorithm} is a hyperparameter, not an algorithm")
    target[key] = _split(f"--set {name}", text)


def _option(key: str, value: Any) -> Any:
    """A fixed option from the command line: text for str fields, else read as a TOML value."""
    hint = _run_fields().get(key, str)
    if not isinstance(value, str):
        return value
    if isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint) and (
            value.strip().lower() == "none"):
        return None  # left out: RunConfig's default
    if _convert(value, hint) is not _BAD:
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value  # not a TOML value: the type check names it


# ------------------------------------------------------------------------- running
@dataclass
class CellResult:
    cell: Cell
    status: str  # ran: ran now; reused: finished by an earlier invocation; failed
    summary: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def default_out(root: str | Path = "runs") -> Path:
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
    out.mkdir(parents=True, exist_ok=True)
    _write_ledger(out, grid, cells, results)
    display.begin(out, len(cells), len(results), jobs)
    for result in _execute(todo, jobs, display):
        results[result.cell.name] = result
        _write_ledger(out, grid, cells, results)
        display.finished(result)
    display.close()
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


def _execute(cells: list[Cell], jobs: int, display: Display) -> Iterator[CellResult]:
    if jobs == 1:
        # In this process: no start-up cost, and the run's own progress bar shows on a terminal.
        for cell in cells:
            _clear(cell.path)
            display.running([cell], own_bar=True)
            config = dataclasses.replace(cell.config, progress=display.live)
            yield _result(cell, *_run_cell(config))
        return
    yield from _parallel(cells, jobs, display)


def _parallel(cells: list[Cell], jobs: int, display: Display) -> Iterator[CellResult]:
    """Up to `jobs` cells at once, each in a process of its own; results as they come."""
    pending = list(reversed(cells))
    while pending:
        # A process that dies (killed, out of memory) breaks its pool: the cells the pool held
        # fail, and the others go on in a fresh pool.
        yield from _pool(pending, jobs, display)


def _pool(pending: list[Cell], jobs: int, display: Display) -> Iterator[CellResult]:
    """Run cells popped from `pending` in one process pool, until none is left or it breaks."""
    running: dict[cf.Future[tuple[dict[str, Any] | None, str | None]], Cell] = {}
    broken = False
    # spawn: a fork of a process that holds torch's thread pools can hang.
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=context, initializer=_one_thread) as pool:
        try:
            while running or (pending and not broken):
                # Submit no more than can run, so that the cells shown as running are.
                while pending and not broken and len(running) < jobs:
                    _clear(pending[-1].path)
                    try:
                        running[pool.submit(_run_cell, pending[-1].config)] = pending[-1]
                        pending.pop()
                    except BrokenProcessPool:
                        broken = True
                display.running(list(running.values()))
                done, _ = cf.wait(running, timeout=display.refresh,
                                  return_when=cf.FIRST_COMPLETED)
                for future in done:
                    yield _collect(running.pop(future), future)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _one_thread() -> None:
    import torch

    # Each simulated run is single-threaded; `jobs` processes then use `jobs` cores.
    torch.set_num_threads(1)


def _collect(cell: Cell, future: cf.Future[tuple[dict[str, Any] | None, str | None]],
             ) -> CellResult:
    try:
        return _result(cell, *future.result())
    except BrokenProcessPool:  # a process of the pool died: this one's, or one beside it
        return CellResult(cell, "failed", error="a process of the pool was terminated abruptly "
                          "(killed, or out of memory?); run again to retry this cell")


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


# ------------------------------------------------------------------------- display
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
    settings = " ".join(f"{k}={_text(v)}" for k, v in {**rest, **cell.hyperparameters}.items())
    bytes_sent = s.get("bytes_sent")
    return (cell.config.algorithm, str(cell.config.workers), settings or "-",
            str(cell.config.seed),
            _num(s.get("test_accuracy"), ".4f") if result.ok else "FAILED",
            _num(s.get("virtual_time_s"), ".4g") if result.ok else "-",
            _num(None if bytes_sent is None else bytes_sent / 1e6, ".2f") if result.ok else "-")
