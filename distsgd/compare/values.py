"""A grid's values typed as the field they set: a RunConfig option or an algorithm's
hyperparameter, as TOML gives them (`workers = "four"` is an error) or as text from the command
line (`--set alpha=none`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from distsgd import algorithms
from distsgd.algorithms.base import type_hints
from distsgd.config import RunConfig
from distsgd.errors import UsageError

OWN = ("hyperparameters", "out", "progress")  # RunConfig fields compare fills itself
BAD = object()  # `convert`'s "no such value of that type"


def run_fields() -> dict[str, Any]:
    """The RunConfig fields a grid file may set, with their types."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if f.name not in OWN}


def hyperparameter(cls: type[algorithms.Algorithm], key: str, value: Any) -> Any:
    """A hyperparameter of `cls`: text parsed as `--set` parses it, else typed as declared."""
    if isinstance(value, str):  # text, as `--set` gives it (also the only way to write none)
        return algorithms.parse_value(cls, key, value)
    return typed(f"{cls.name}: {key}", value, type_hints(cls)[key])


def typed(where: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` declares, or `UsageError` naming `where` and that type."""
    converted = convert(value, hint)
    if converted is BAD:
        raise UsageError(f"{where}={value!r} is not a valid {_kind(hint)}")
    return converted


def convert(value: Any, hint: Any) -> Any:
    """`value` as the type `hint` declares, or `BAD` (a TOML list is a tuple, an int a float)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        return next((c for c in (convert(value, a) for a in args) if c is not BAD), BAD)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            return BAD
        kinds = [args[0]] * len(value) if args[-1:] == (Ellipsis,) else list(args)
        items = [convert(v, k) for v, k in zip(value, kinds, strict=False)]
        return tuple(items) if len(kinds) == len(value) and BAD not in items else BAD
    if hint is float and type(value) in (int, float):
        return float(value)  # TOML writes 1 for 1.0
    return value if hint in (bool, int, str) and type(value) is hint else BAD


def _kind(hint: Any) -> str:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        return " or ".join(_kind(a) for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        if args[-1:] == (Ellipsis,):
            return f"list of {_kind(args[0])}"
        return f"[{', '.join(_kind(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))
