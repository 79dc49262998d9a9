"""easgd-async and eamsgd: asynchronous Elastic Averaging SGD (Zhang et al. 2015, Alg. 1 and 2)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distsgd import mixing
from distsgd.algorithms.base import WorkerContext, hyperparameter
from distsgd.algorithms.easgd import ElasticRates
from distsgd.algorithms.ps import ClientState, ParameterServerAlgorithm, connect
from distsgd.algorithms.registry import register


@dataclass
class ElasticClientState(ClientState):
    # EAMSGD's Nesterov buffer b (v = −η b); zero, and unused, in easgd-async.
    momentum: torch.Tensor = field(kw_only=True)


@register
@dataclass(frozen=True)
class EASGDAsync(ElasticRates, ParameterServerAlgorithm[None]):
    """Algorithm 1: every τ steps, x_i ← x_i − α(x_i − x̃) and x̃ ← x̃ + α(x_i − x̃) through the
    server; the gradient step uses the gradient taken before the elastic pull.

    The pull and the push are one exchange (the server moves x̃ as it answers), so no other
    worker's update can fall between them.
    """

    name = "easgd-async"
    paper = "Zhang, Choromanska, LeCun 2015, 'Deep learning with Elastic Averaging SGD', Alg. 1"
    sends = "every τ steps: |x| to the server and |x| back"

    def local_momentum(self) -> bool:
        return False  # Algorithm 1's workers take plain gradient steps; EAMSGD adds its own δ

    def default_lr(self) -> float:
        # Half the effective step of momentum SGD (0.9) at 0.05: plain SGD at 0.5 with batch 32
        # occasionally blows up on one worker by itself (a few workers in a hundred within 600
        # steps on fashion-mnist's mlp, alpha = 0), and the center passes that worker's model on
        # to all the others, so the chance that a run dies grows with N (docs/algorithms.md).
        return 0.25

    def init(self, ctx: WorkerContext) -> ElasticClientState:
        client, anchor = connect(ctx, self.bounded)
        return ElasticClientState(client, anchor, momentum=torch.zeros(
            ctx.flat.num_params, dtype=ctx.flat.dtype, device=ctx.flat.device))

    def after_backward(self, ctx: WorkerContext, state: ElasticClientState) -> None:
        if ctx.step % self.period == 0:  # t mod τ = 0, t counted from 0 as in the paper
            x = self.elastic_point(ctx, state)
            center = state.client.elastic(x)
            e = mixing.elastic_difference(x, center, self.moving_rate(ctx.workers))
            ctx.flat.set_(ctx.flat.get() - e)

    def elastic_point(self, ctx: WorkerContext, state: ElasticClientState) -> torch.Tensor:
        """The x whose distance to x̃ the elastic force acts on (the model itself here)."""
        return ctx.flat.get()


@register
@dataclass(frozen=True)
class EAMSGD(EASGDAsync):
    """Algorithm 2: easgd-async with Nesterov momentum δ on the worker (δ = 0 is easgd-async).

    The model holds the look-ahead point x + δv, where the gradient is taken; the elastic force
    acts on x = (x + δv) − δv and moves both alike. The momentum is the algorithm's own, so the
    workers' optimizer is plain SGD.
    """

    name = "eamsgd"
    paper = "Zhang, Choromanska, LeCun 2015, 'Deep learning with Elastic Averaging SGD', Alg. 2"

    delta: float = hyperparameter(0.9, "δ: the workers' Nesterov momentum (paper: 0.99)",
                                  low=0.0, high=1.0, high_open=True)

    def default_lr(self) -> float:
        return 0.05 * (1 - self.delta) / 0.1  # 0.05 at δ = 0.9: the same effective step

    def after_backward(self, ctx: WorkerContext, state: ElasticClientState) -> None:
        super().after_backward(ctx, state)
        grad, state.momentum = mixing.nesterov_gradient(ctx.flat.grads(), state.momentum,
                                                        self.delta)
        ctx.flat.set_grads_(grad)

    def elastic_point(self, ctx: WorkerContext, state: ElasticClientState) -> torch.Tensor:
        # x = look-ahead − δv, and v = −η b in the buffer's units.
        x = ctx.flat.get()
        lr = ctx.optimizer.param_groups[0]["lr"] if ctx.optimizer is not None else ctx.lr
        x[: ctx.flat.num_params] += self.delta * lr * state.momentum
        return x
