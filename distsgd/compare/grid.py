"""The grid: a checked spec (`GridSpec`) and the cells it expands to; the file format is in
`distsgd.compare`'s docstring."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distsgd import algorithms
from distsgd.compare.cell import Cell, cell_name
from distsgd.compare.values import OWN, hyperparameter, run_fields, typed
from distsgd.config import RunConfig
from distsgd.errors import UsageError, check_range, did_you_mean

AXES = ("algorithm", "workers", "seed")  # coordinates of every cell, always in its name
BACKENDS = ("sim", "processes")  # torchrun starts one run, not a grid


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
            return cls._one(doc, table_at(doc, "grid"), description, source)
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
        run, axes = _run_options(table_at(doc, "run")), _axes(grid)
        both = sorted(set(run) & set(axes))
        if both:
            raise UsageError(f"{both[0]} is both in [run] and in [grid]; keep one")
        shared, per_algorithm = _hyperparameters(table_at(grid, "hyperparameters"), names)
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
        hyper = {k: [hyperparameter(cls, k, v) for v in values]
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

TARGETS = ("target_accuracy", "target_loss")  # the keys of [report]


def report_targets(doc: Mapping[str, Any]) -> dict[str, float]:
    """The checked [report] table of a grid document: target_accuracy in (0, 1], target_loss > 0."""
    table = table_at(doc, "report")
    _known("[report]", table, TARGETS)
    targets = {k: typed(f"report.{k}", v, float) for k, v in table.items()}
    if "target_accuracy" in targets:
        check_range("report.target_accuracy", targets["target_accuracy"], 0, 1, low_open=True)
    if "target_loss" in targets:
        check_range("report.target_loss", targets["target_loss"], 0, low_open=True)
    return targets


def _known(where: str, table: Mapping[str, Any], valid: Sequence[str]) -> None:
    unknown = [k for k in table if k not in valid]
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r} in {where}; valid keys: "
                         f"{', '.join(sorted(valid))}{did_you_mean(unknown[0], valid)}")


def table_at(doc: Mapping[str, Any], key: str) -> dict[str, Any]:
    """`doc[key]` (empty when absent), or `UsageError` when it is not a table."""
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


def _run_options(table: Mapping[str, Any]) -> dict[str, Any]:
    fields = run_fields()
    for key in table:
        if key in AXES:
            raise UsageError(f"{key} is an axis: put it in [grid] (one value or a list)")
        if key in OWN:
            hint = "[grid.hyperparameters]" if key == "hyperparameters" else "the command line"
            raise UsageError(f"{key} cannot be in [run]; set it in {hint}")
    _known("[run]", table, [k for k in fields if k not in AXES])
    run = {k: typed(f"run.{k}", v, fields[k]) for k, v in table.items()}
    _check_backend("run.backend", run.get("backend", "sim"))
    return run


def _axes(grid: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
    fields = run_fields()
    _known("[grid]", grid, ["algorithm", "hyperparameters", *fields])
    axes = {}
    for key, value in grid.items():
        if key in ("algorithm", "hyperparameters"):
            continue
        axes[key] = tuple(typed(f"grid.{key}", v, fields[key])
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
                                 f"{', '.join(known) or 'none'}{did_you_mean(key, known)}")
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
