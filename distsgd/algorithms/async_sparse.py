"""async-sparse: asynchronous SGD with sparse gradients (Chan & Lane 2014)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distsgd import mixing
from distsgd.algorithms.base import WorkerContext, hyperparameter
from distsgd.algorithms.ps import ClientState, ParameterServerAlgorithm, Shard, connect
from distsgd.algorithms.registry import register

DECAYS = ("power", "inverse")


@dataclass
class Residual:
    acc: torch.Tensor  # gradient mass not sent yet
    buffers: torch.Tensor  # float buffers as last pulled (their change is pushed densely)
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    dense: torch.Tensor | None = None


@dataclass
class SparseClientState(ClientState):
    residual: Residual = field(kw_only=True)


@dataclass
class Velocity:
    """The server's momentum V."""

    v: torch.Tensor = field(default_factory=lambda: torch.empty(0))


@register
@dataclass(frozen=True)
class AsyncSparse(ParameterServerAlgorithm[Velocity]):
    """Worker k: pull x̃ (version T_k); g = ∇f(x̃); acc ← acc + g; push the top-k of acc; acc ← γ ×
    (acc − sent). Server: τ = T − T_k; s ← decay(τ) s; V ← μV − ηs; x̃ ← x̃ + V; T ← T + 1.

    The paper fixes none of these details (an open point of the design): top-k by magnitude with k
    a ratio (1.0 = dense), γ the decay of the unsent residual, the staleness decay λ^τ or
    1/(1 + τ), and momentum μ at the server. Float buffers (BatchNorm statistics) are not
    gradients: their change since the pull is pushed densely and added, divided by N.
    """

    name = "async-sparse"
    paper = "Chan & Lane 2014, 'Distributed asynchronous optimization of CNNs'"
    sends = "every step: k = ratio × |x| (value, index) pairs up, |x| down"

    ratio: float = hyperparameter(0.01, "fraction of gradient entries sent (1.0: dense)",
                                  low=0.0, high=1.0, low_open=True)
    gamma: float = hyperparameter(1.0, "γ: decay of the unsent residual (1.0: off)",
                                  low=0.0, high=1.0)
    lam: float = hyperparameter(1.0, "λ: staleness decay λ^τ of a push (1.0: off)",
                                low=0.0, high=1.0)
    decay: str = hyperparameter("power", "staleness decay form: power (λ^τ) | inverse "
                                "(1/(1+τ))", choices=DECAYS)
    mu: float = hyperparameter(0.9, "μ: momentum applied at the server", low=0.0, high=1.0,
                               high_open=True)

    def local_momentum(self) -> bool:
        return False  # the server applies the learning rate and the momentum

    def default_lr(self) -> float:
        return 0.05 * (1 - self.mu)  # the same effective step η / (1 − μ) as the others

    def init(self, ctx: WorkerContext) -> SparseClientState:
        client, anchor = connect(ctx, self.bounded)
        n = ctx.flat.num_params
        residual = Residual(torch.zeros(n, dtype=ctx.flat.dtype, device=ctx.flat.device),
                            anchor[n:].clone())
        return SparseClientState(client, anchor, residual=residual)

    def after_backward(self, ctx: WorkerContext, state: SparseClientState) -> None:
        r = state.residual
        r.acc.add_(ctx.flat.grad_buffer())
        if self.ratio >= 1.0:
            r.dense, r.pending = r.acc.clone(), None
            r.acc.zero_()
        else:
            k = max(1, round(self.ratio * r.acc.numel()))
            indices, values = mixing.top_k(r.acc, k)
            r.pending, r.dense = (indices, values.clone()), None
            r.acc[indices] = 0
        r.acc.mul_(self.gamma)

    def after_step(self, ctx: WorkerContext, state: SparseClientState) -> None:
        # The local optimizer's step is discarded: the server owns η and μ. Sent: the gradient
        # part of the update, and the float buffers' change since the pull.
        r = state.residual
        n = ctx.flat.num_params
        buffers = (ctx.flat.buffer_values() - r.buffers).div_(ctx.workers)
        if r.dense is not None:
            state.client.push(torch.cat([r.dense, buffers]))
        else:
            assert r.pending is not None
            indices, values = r.pending
            if buffers.numel():
                indices = torch.cat([indices, torch.arange(n, n + buffers.numel(),
                                                            device=indices.device)])
                values = torch.cat([values, buffers])
            state.client.push_sparse(indices, values)
        state.anchor = state.client.pull()
        r.buffers = state.anchor[n:].clone()
        ctx.flat.set_(state.anchor)

    # -------------------------------------------------------------------- server side
    def server_init(self, shard: Shard[Velocity], ctx: WorkerContext) -> Velocity:
        return Velocity(torch.zeros(shard.num_params, dtype=shard.x.dtype, device=shard.x.device))

    def apply(self, shard: Shard[Velocity], update: torch.Tensor, tau: int,
              ctx: WorkerContext) -> None:
        n = shard.num_params
        scale = self.lam**tau if self.decay == "power" else 1.0 / (1.0 + tau)
        gradient = update[:n] if scale == 1.0 else update[:n] * scale
        velocity = shard.checked_rule()
        velocity.v.mul_(self.mu).add_(gradient, alpha=-ctx.lr)
        shard.x[:n].add_(velocity.v)
        shard.x[n:].add_(update[n:])  # buffers: their averaged change, as pushed
