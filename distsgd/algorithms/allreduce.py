"""allreduce: synchronous data-parallel SGD (AllReduce-SGD), the baseline of every paper here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distsgd.algorithms.base import Algorithm, WorkerContext, average_gradients_
from distsgd.algorithms.registry import register


@register
@dataclass(frozen=True)
class AllReduce(Algorithm):
    """Average gradients over all workers every step (one all-reduce of |x| per step).

    Floating-point buffers (BatchNorm running statistics) are not gradients; they ride in the same
    all-reduce and are averaged too, so every worker keeps an identical model.
    """

    name = "allreduce"
    paper = "synchronous data-parallel SGD (e.g. Goyal et al. 2017)"
    sends = "one all-reduce of the gradients (and float buffers) every step"

    def after_backward(self, ctx: WorkerContext, state: Any) -> None:
        if ctx.workers > 1:
            average_gradients_(ctx, ctx.workers_group)
