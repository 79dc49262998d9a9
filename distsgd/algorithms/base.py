"""The `Algorithm` contract: a frozen config composed of training hooks, a measured model and a
server role (`distsgd.algorithms.hooks`).

An algorithm is a frozen dataclass; its fields are its hyperparameters with the papers' names
(declared with `hyperparameter`, which records the meaning and the valid range). Per-worker mutable
state lives in the object `init` returns; in the simulator every worker shares one config object.
Algorithms talk to the network only through ``ctx.comm``, never to the torch backend itself.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from distsgd.algorithms.context import WorkerContext, average_gradients_
from distsgd.algorithms.hooks import MeasuredModel, ServerRole, TrainingHooks
from distsgd.errors import UsageError, check_range, check_type

__all__ = ["Algorithm", "MeasuredModel", "ServerRole", "TrainingHooks", "WorkerContext",
           "average_gradients_", "check_fields", "hyperparameter", "type_hints"]


def hyperparameter(default: Any, help: str, *, low: float | None = None,
                   high: float | None = None, low_open: bool = False, high_open: bool = False,
                   choices: tuple[Any, ...] | None = None) -> Any:
    """A config field with its meaning and valid range, checked when the config is built."""
    return field(default=default, metadata={
        "help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
        "choices": choices})


@dataclass(frozen=True)
class Algorithm(TrainingHooks, MeasuredModel, ServerRole):
    """Base class of every algorithm; subclasses are frozen dataclasses registered by name.

    Its own methods are the run-level decisions (default learning rate, whose momentum, checks);
    the hooks, the evaluated model and the server role come from the three parts it composes.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    synchronous: ClassVar[bool] = True
    sends: ClassVar[str] = ""  # what one worker sends per step, for `distsgd list` and the README

    def __post_init__(self) -> None:
        check_fields(self)

    def default_lr(self) -> float:
        """The learning rate a run uses when none is given (momentum at a server multiplies the
        effective step by 1/(1 − μ), so such algorithms default to a smaller one)."""
        return 0.05

    def local_momentum(self) -> bool:
        """False when the algorithm applies momentum of its own (EAMSGD's δ, a server's μ): the
        training loop then gives the workers plain SGD, whatever --momentum says."""
        return True

    def validate(self, workers: int, lr: float) -> list[str]:
        """Checks that depend on the run; raise `UsageError`, or return warnings to print."""
        return []


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(config: Algorithm) -> None:
    """Raise `UsageError` naming the first hyperparameter outside its declared range."""
    hints = type_hints(type(config))
    for f in dataclasses.fields(config):
        meta, value = f.metadata, getattr(config, f.name)
        where = f"{config.name}: {f.name}"
        check_type(where, value, hints[f.name])
        if not meta or value is None:
            continue
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise UsageError(f"{where}={value!r} is not a valid choice; valid choices: "
                             f"{', '.join(map(str, meta['choices']))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            check_range(where, value, meta.get("low"), meta.get("high"),
                        low_open=meta["low_open"], high_open=meta["high_open"],
                        meaning=meta["help"], finite=meta.get("high") != math.inf)
