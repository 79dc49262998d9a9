"""easgd: synchronous Elastic Averaging SGD (Zhang, Choromanska, LeCun 2015)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distsgd import mixing
from distsgd.algorithms.base import Algorithm, WorkerContext, hyperparameter
from distsgd.algorithms.registry import register


@dataclass(frozen=True)
class ElasticRates:
    """The hyperparameters every elastic-averaging algorithm shares (Zhang et al. 2015)."""

    period: int = hyperparameter(10, "τ: local steps between two elastic updates", low=1)
    beta: float = hyperparameter(0.9, "β = Nα: total moving rate, used when alpha is none",
                                 low=0.0, high=1.0)
    alpha: float | None = hyperparameter(None, "α = ηρ: moving rate per worker (none: β/N)",
                                         low=0.0, high=1.0)

    def moving_rate(self, workers: int) -> float:
        return self.alpha if self.alpha is not None else self.beta / workers


@dataclass
class EASGDState:
    center: torch.Tensor  # x̃: every worker keeps an identical copy


@register
@dataclass(frozen=True)
class EASGD(ElasticRates, Algorithm):
    """Every τ steps, in lock-step: d_i = α(x_i − x̃); x_i ← x_i − d_i; x̃ ← x̃ + Σ_i d_i.

    Σ_i d_i is one all-reduce; each worker applies it to its own copy of x̃, so the copies stay
    identical without a server. α defaults to β/N with the paper's β = 0.9.
    """

    name = "easgd"
    paper = "Zhang, Choromanska, LeCun 2015, 'Deep learning with Elastic Averaging SGD'"
    sends = "one all-reduce of |x| every τ steps"

    def validate(self, workers: int, lr: float) -> list[str]:
        # The paper's stability region for the round-robin 1-D quadratic (§3.2 / Lemma). It bounds
        # ηh, h the curvature, taken as 1 here: it catches gross settings only, since a network's
        # h is unknown (docs/algorithms.md, easgd-async, for what breaks plain SGD at lr 0.5).
        alpha = self.moving_rate(workers)
        if not (0 <= lr <= 2 and 0 <= alpha <= (4 - 2 * lr) / (4 - lr)):
            return [f"easgd: lr={lr} and alpha={alpha:g} lie outside the paper's stability "
                    f"region 0 <= lr <= 2, 0 <= alpha <= (4 - 2 lr)/(4 - lr)"]
        return []

    def init(self, ctx: WorkerContext) -> EASGDState:
        return EASGDState(center=ctx.flat.get())

    def after_step(self, ctx: WorkerContext, state: EASGDState) -> None:
        if (ctx.step + 1) % self.period:
            return
        x = ctx.flat.get()
        d = mixing.elastic_difference(x, state.center, self.moving_rate(ctx.workers))
        ctx.flat.set_(x - d)
        ctx.comm.all_reduce_(d, group=ctx.workers_group)
        state.center.add_(d)

    def evaluated(self, ctx: WorkerContext, state: EASGDState) -> tuple[torch.Tensor, float]:
        return state.center.clone(), 1.0
