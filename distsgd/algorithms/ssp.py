"""ssp: stale synchronous parallel SGD (Ho et al. 2013; Kumar, Xie, Yin, Xing 2015)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from distsgd.algorithms.base import WorkerContext, hyperparameter
from distsgd.algorithms.ps import (
    ClientState,
    ParameterServerAlgorithm,
)
from distsgd.algorithms.registry import register
from distsgd.errors import UsageError


@register
@dataclass(frozen=True)
class SSP(ParameterServerAlgorithm[None]):
    """Each worker has a clock c (pushes made). It may compute step c only once the slowest live
    worker's clock is at least c − s, so it never misses an update more than s clocks old; the
    server holds its pull until then. s = 0 is bulk-synchronous, s = inf fully asynchronous.

    The worker applies its own update to its view at once (read-my-writes), pushes it, and
    refreshes its view every clock. Updates are applied divided by N, so that s = 0 is synchronous
    SGD with averaged gradients at the same learning rate (the papers add them: scale lr by N).
    """

    name = "ssp"
    paper = "Ho et al. 2013, 'More effective distributed ML via a stale synchronous parallel PS'"
    sends = "every step: push |x| and pull |x| (held back while the bound s is exceeded)"

    bounded = True
    s: float = hyperparameter(3, "staleness bound in clocks (0: bulk-synchronous, inf: async)",
                              low=0, high=math.inf)

    def __post_init__(self) -> None:
        super().__post_init__()
        if math.isfinite(self.s) and self.s != int(self.s):
            raise UsageError(f"ssp: s={self.s!r} is not valid: valid values are whole numbers "
                             ">= 0 or inf")

    def local_momentum(self) -> bool:
        # Ho et al.'s workers run plain SGD; momentum on views several clocks stale destabilises
        # training (seen on digits: accuracy collapsing mid-run at s=3).
        return False

    def default_lr(self) -> float:
        return 0.5  # = 0.05 / (1 − 0.9): the effective step of momentum SGD at 0.05

    def after_step(self, ctx: WorkerContext, state: ClientState) -> None:
        x = ctx.flat.get()
        update = (x - state.anchor).div_(ctx.workers)
        clock = ctx.step + 1  # pushes made, this one included
        state.client.push(update, clock=clock)
        # Before computing step `clock`, every update up to clock − s − 1 must be in the view.
        state.anchor = state.client.pull(needed_clock=clock - self.s)
        ctx.flat.set_(state.anchor)

