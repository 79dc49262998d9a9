"""downpour: asynchronous SGD through a parameter server (Dean et al. 2012), and its variants."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distsgd.algorithms.base import WorkerContext, hyperparameter
from distsgd.algorithms.ps import (
    ClientState,
    ParameterServerAlgorithm,
    Shard,
)
from distsgd.algorithms.registry import register

VARIANTS = ("plain", "momentum", "average", "moving-average")


@dataclass
class DownpourRule:
    """The server's state beyond x̃, per variant."""

    velocity: torch.Tensor | None = None  # mdownpour
    average: torch.Tensor | None = None  # adownpour, mvadownpour


@register
@dataclass(frozen=True)
class Downpour(ParameterServerAlgorithm[DownpourRule]):
    """Workers take local SGD steps; every τ steps they push the accumulated update (x̃ ← x̃ + Σu)
    and pull x̃. Variants of the EASGD paper (Zhang et al. 2015, §5): momentum = MDOWNPOUR
    (Nesterov momentum δ at the server), average = ADOWNPOUR (the server's running average of x̃
    is evaluated), moving-average = MVADOWNPOUR (z ← (1 − a) z + a x̃)."""

    name = "downpour"
    paper = "Dean et al. 2012, 'Large scale distributed deep networks' (DOWNPOUR)"
    sends = "every τ steps: push |x| and pull |x| (server round trip)"

    period: int = hyperparameter(1, "τ: local steps between push/pull (1: plain async SGD)", low=1)
    variant: str = hyperparameter("plain", "plain | momentum (MDOWNPOUR) | average (ADOWNPOUR) | "
                                  "moving-average (MVADOWNPOUR)", choices=VARIANTS)
    delta: float = hyperparameter(0.9, "δ: the server's Nesterov momentum (variant momentum)",
                                  low=0.0, high=1.0, high_open=True)
    rate: float = hyperparameter(0.001, "a: moving-average rate (variant moving-average)",
                                 low=0.0, high=1.0, low_open=True)

    def local_momentum(self) -> bool:
        return False  # DOWNPOUR's workers run plain SGD; MDOWNPOUR's momentum is the server's

    def default_lr(self) -> float:
        return 0.05 * (1 - self.delta) if self.variant == "momentum" else 0.05

    def after_step(self, ctx: WorkerContext, state: ClientState) -> None:
        if (ctx.step + 1) % self.period:
            return
        x = ctx.flat.get()
        state.client.push(x - state.anchor)  # the updates accumulated since the last pull
        state.anchor = state.client.pull()
        ctx.flat.set_(state.anchor)

    # -------------------------------------------------------------------- server side
    def server_init(self, shard: Shard[DownpourRule], ctx: WorkerContext) -> DownpourRule:
        extras = DownpourRule()
        if self.variant == "momentum":
            extras.velocity = torch.zeros_like(shard.x)
        if self.variant in ("average", "moving-average"):
            extras.average = shard.x.clone()
        return extras

    def apply(self, shard: Shard[DownpourRule], update: torch.Tensor, tau: int,
              ctx: WorkerContext) -> None:
        extras = shard.checked_rule()
        if extras.velocity is not None:
            # Nesterov at the server: v ← δ v + u; x̃ ← x̃ + δ v + u.
            extras.velocity.mul_(self.delta).add_(update)
            shard.x.add_(update).add_(extras.velocity, alpha=self.delta)
        else:
            shard.x.add_(update)
        if extras.average is not None:
            t = shard.version + 1  # updates applied, this one included
            a = 1.0 / (t + 1) if self.variant == "average" else self.rate
            extras.average.mul_(1 - a).add_(shard.x, alpha=a)

    def server_evaluated(self, shard: Shard[DownpourRule]) -> torch.Tensor:
        extras = shard.checked_rule()
        return extras.average if extras.average is not None else shard.x
