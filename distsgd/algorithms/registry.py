"""The registry that maps algorithm names to their config classes, and typed settings."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from distsgd.algorithms.base import Algorithm, type_hints
from distsgd.errors import UsageError, did_you_mean

A = TypeVar("A", bound=type[Algorithm])

REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: A) -> A:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"algorithm name {cls.name!r} is empty or registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Algorithm]:
    if not isinstance(name, str) or name not in REGISTRY:
        valid = ", ".join(sorted(REGISTRY))
        raise UsageError(f"unknown algorithm {name!r}{did_you_mean(name, REGISTRY)}; "
                         f"valid choices: {valid}")
    return REGISTRY[name]


def create(name: str, settings: dict[str, str] | None = None, **values: Any) -> Algorithm:
    """Build the config of algorithm `name` from typed `values` and textual `settings`."""
    cls = get(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = dict(values)
    for key, text in (settings or {}).items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise UsageError(f"{name} has no hyperparameter {key!r}"
                             f"{did_you_mean(key, fields)}; valid hyperparameters: {valid}")
        kwargs[key] = parse_value(cls, key, text)
    unknown = set(kwargs) - set(fields)
    if unknown:
        first = sorted(unknown)[0]
        raise UsageError(f"{name} has no hyperparameter {first!r}"
                         f"{did_you_mean(first, fields)}; valid "
                         f"hyperparameters: {', '.join(sorted(fields)) or 'none'}")
    return cls(**kwargs)


def parse_settings(items: list[str]) -> dict[str, str]:
    """``--set NAME=VALUE`` arguments as {name: text}; `parse_value` types them per algorithm."""
    settings: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--set {item!r} is not NAME=VALUE (e.g. --set period=4)")
        settings[name.strip()] = value
    return settings


def parse_value(cls: type[Algorithm], key: str, text: str) -> Any:
    """Turn `text` into the type the config field `key` declares (``none`` for optional ones)."""
    hint = type_hints(cls)[key]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and text.strip().lower() in ("none", "null", ""):
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _parse(option, text)
        except ValueError as e:
            errors.append(str(e))
    kinds = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise UsageError(f"{cls.name}: {key}={text!r} is not a valid {kinds}")


def _parse(kind: Any, text: str) -> Any:
    text = text.strip()
    if kind is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)
    if kind is int:
        return int(text)
    if kind is float:
        value = float(text)
        return value
    if kind is str:
        return text
    raise ValueError(f"cannot parse {kind}")
