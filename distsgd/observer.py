"""What a worker publishes at an evaluation point, and the protocol of whoever watches it
(`distsgd.evaluation` implements it): the loop and the measurement meet here, not in each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from distsgd.algorithms.base import WorkerContext


@dataclass
class Contribution:
    """What one worker publishes at an evaluation point."""

    params: torch.Tensor  # its model (for the consensus distance)
    evaluated: torch.Tensor  # its share of the evaluated model
    weight: float
    loss_sum: float
    loss_count: int
    bytes_sent: int
    clock: float | None
    extra: dict[str, Any] = field(default_factory=dict)  # the algorithm's own figures


class Observer(Protocol):
    """How long a worker trains, when its state is evaluated (see `distsgd.evaluation`), and
    when it is checkpointed (`capture` gives the worker's whole state, see `distsgd.checkpoint`)."""

    def begin(self, ctx: WorkerContext, snapshot: Callable[[], Contribution],
              capture: Callable[[], dict[str, Any]] | None = None) -> None: ...

    def take(self, ctx: WorkerContext, done: int) -> bool: ...

    def stepped(self, ctx: WorkerContext, done: int,
                snapshot: Callable[[], Contribution]) -> None: ...
