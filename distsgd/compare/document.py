"""The grid document: read from a TOML file, with the command line's flags written over it."""

from __future__ import annotations

import copy
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distsgd.compare.grid import table_at
from distsgd.compare.values import BAD, convert, run_fields
from distsgd.errors import UsageError


def load(path: str | Path) -> dict[str, Any]:
    """The TOML document at `path`; `UsageError` when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UsageError(f"cannot read grid file {str(path)!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"grid file {str(path)!r} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8
        raise UsageError(f"grid file {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise UsageError(f"grid file {str(path)!r} nests its tables or lists too deeply") from None


def override(base: Mapping[str, Any], *, algorithm: str | None = None,
             workers: str | None = None, seed: str | None = None,
             settings: Sequence[str] = (), options: Mapping[str, Any] | None = None,
             ) -> dict[str, Any]:
    """`base` with the command line's entries replacing its own (flags are text: `a,b` lists)."""
    doc = copy.deepcopy(dict(base))
    run = doc["run"] = table_at(doc, "run")
    grids = doc["grid"] if isinstance(doc.get("grid"), list) else [table_at(doc, "grid")]
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
        grid["hyperparameters"] = hyper = table_at(grid, "hyperparameters")
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
    hint = run_fields().get(key, str)
    if not isinstance(value, str):
        return value
    if isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint) and (
            value.strip().lower() == "none"):
        return None  # left out: RunConfig's default
    if convert(value, hint) is not BAD:
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value  # not a TOML value: the type check names it
