"""local-sgd: periodic model averaging (every τ local steps, an all-reduce of the parameters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distsgd.algorithms.base import Algorithm, WorkerContext, hyperparameter
from distsgd.algorithms.registry import register


@register
@dataclass(frozen=True)
class LocalSGD(Algorithm):
    """Workers take τ local steps, then replace their models by the average (Stich 2019).

    τ = 1 with plain SGD equals allreduce: averaging the models after one step from a common
    point is averaging the gradients.
    """

    name = "local-sgd"
    paper = "Stich 2019, 'Local SGD converges fast and communicates little'"
    sends = "one all-reduce of |x| every τ steps"

    period: int = hyperparameter(4, "τ: local steps between two model averages", low=1)

    def after_step(self, ctx: WorkerContext, state: Any) -> None:
        if ctx.workers == 1 or (ctx.step + 1) % self.period:
            return
        x = ctx.flat.get()
        ctx.comm.all_reduce_(x, group=ctx.workers_group)
        ctx.flat.set_(x.div_(ctx.workers))
