"""diloco: DiLoCo (Douillard et al. 2023, arXiv 2311.08105); Streaming DiLoCo (arXiv 2501.18512)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distsgd.algorithms.base import Algorithm, WorkerContext, hyperparameter
from distsgd.algorithms.registry import register
from distsgd.errors import UsageError

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class OuterState:
    theta: torch.Tensor  # the shared parameters θ of the last synchronisation, every fragment
    velocity: torch.Tensor  # the outer Nesterov momentum buffer (parameter part only is used)
    fragments: list[torch.Tensor]  # indices into the flat vector, one tensor per fragment
    # Outer results not yet merged (τ > 0): (step count at which to merge, fragment, new θ_p).
    pending: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)


@register
@dataclass(frozen=True)
class DiLoCo(Algorithm):
    """H inner steps of each worker's own optimizer, then one outer step on the shared θ.

    Outer step (every H steps): x̄ = mean_i x_i (one all-reduce), the outer gradient
    Δ = θ − x̄, Nesterov momentum v ← μv + Δ, θ ← θ − lr(Δ + μv), written as
    θ ← x̄ + (1 − lr)Δ − lr·μ·v so that lr = 1, μ = 0 is the plain average (local-sgd with period
    H, bit for bit); every worker restarts from θ. Float buffers (BatchNorm statistics) are
    averaged, not stepped. The inner optimizer is the training loop's (SGD with --momentum in the
    CLI; the paper uses AdamW), and its state stays local across rounds, as in the paper.

    Streaming DiLoCo: `fragments` P splits the model's top-level blocks, strided (block b belongs
    to fragment b mod P, the paper's strided pattern); fragment p is synchronised when
    (t + ⌊pH/P⌋) mod H = 0 (t the steps done), so the P synchronisations are spread evenly over
    the period. The result of a synchronisation at t is merged at t + τ, the worker having trained
    on meanwhile: x_p ← α x_p + (1 − α) θ_p. α weighs the local copy, the convention of Streaming
    DiLoCo (Douillard et al. 2025, arXiv 2501.18512: the merge mixes the local fragment, weight α,
    with the global one) and of torchft's implementation, ``DiLoCo(fragment_update_alpha=α)``,
    which lerps the outer-updated global toward the saved local copy by α (default 0). So α = 0
    takes the synchronised fragment (plain DiLoCo, our default too) and α = 1 would keep the local
    one, never synchronising. `precision` sends the outer
    gradient Δ_i = θ − x_i in bfloat16 or float16 (accumulated in float32 afterwards); float32
    averages x_i itself, the same Δ in exact arithmetic. Comm has no non-blocking collective, so
    τ delays the merge, not the all-reduce's time.
    """

    name = "diloco"
    paper = ("Douillard et al. 2023, 'DiLoCo: Distributed Low-Communication Training of "
             "Language Models'; Streaming DiLoCo, Douillard et al. 2025")
    sends = "one all-reduce of |x|/P every H/P steps (|x| every H steps), at the chosen precision"

    # H = 500 in the paper, a run of 88k steps; 10 gives 8 workers on digits (169 steps) 16 outer
    # steps, and exchanges within the conformance suite's 12 steps.
    H: int = hyperparameter(10, "inner steps between two outer steps", low=1)
    outer_lr: float = hyperparameter(0.7, "outer learning rate (the paper's 0.7)", low=0.0)
    outer_momentum: float = hyperparameter(
        0.9, "outer Nesterov momentum μ (the paper's 0.9)", low=0.0, high=1.0, high_open=True)
    fragments: int = hyperparameter(1, "P: parts of the model synchronised in turn", low=1)
    tau: int = hyperparameter(0, "τ: inner steps between a synchronisation and its merge", low=0)
    alpha: float = hyperparameter(
        0.0, "α: weight of the local copy in the merge (0: take the synchronised one)",
        low=0.0, high=1.0)
    precision: str = hyperparameter("float32", "dtype the outer gradient is sent in",
                                    choices=tuple(PRECISIONS))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau >= self.H:
            raise UsageError(f"diloco: tau={self.tau} is out of range: valid values lie in "
                             f"[0, H - 1] = [0, {self.H - 1}] (a merge must land before the "
                             "fragment's next synchronisation)")

    def init(self, ctx: WorkerContext) -> OuterState:
        theta = ctx.flat.get()
        return OuterState(theta=theta, velocity=torch.zeros_like(theta),
                          fragments=self._fragments(ctx))

    def _fragments(self, ctx: WorkerContext) -> list[torch.Tensor]:
        """Flat indices of each fragment: the model's top-level blocks holding state, strided."""
        owner: dict[int, int] = {}
        children = [c for c in ctx.model.children()
                    if any(True for _ in c.parameters()) or any(True for _ in c.buffers())]
        for i, child in enumerate(children):
            for t in [*child.parameters(), *child.buffers()]:
                owner.setdefault(id(t), i)
        blocks = max(len(children), 1)
        if self.fragments > blocks:
            raise UsageError(f"diloco: fragments={self.fragments} is out of range for a model "
                             f"of {blocks} top-level blocks: valid values lie in [1, {blocks}]")
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.fragments)]
        start = 0
        for t, size in zip(ctx.flat.tensors, ctx.flat.sizes, strict=True):
            parts[owner.get(id(t), 0) % self.fragments].append(
                torch.arange(start, start + size, device=ctx.flat.device))
            start += size
        return [torch.cat(p) if p else torch.empty(0, dtype=torch.long) for p in parts]

    def after_step(self, ctx: WorkerContext, state: OuterState) -> None:
        if ctx.workers == 1:
            return
        done = ctx.step + 1
        for p in range(self.fragments):
            if (done + p * self.H // self.fragments) % self.H == 0:
                theta_p = self._outer_step(ctx, state, state.fragments[p])
                state.pending.append((done + self.tau, p, theta_p))
        due = [m for m in state.pending if m[0] == done]
        if due:
            x = ctx.flat.get()
            for _, p, theta_p in due:
                idx = state.fragments[p]
                # α = 0 replaces exactly (0·x + θ would too, but not for an infinite x).
                x[idx] = theta_p if self.alpha == 0 else (
                    self.alpha * x[idx] + (1 - self.alpha) * theta_p)
            ctx.flat.set_(x)
            state.pending = [m for m in state.pending if m[0] != done]

    def _outer_step(self, ctx: WorkerContext, state: OuterState, idx: torch.Tensor) -> torch.Tensor:
        """All-reduce fragment `idx`, apply the outer Nesterov step; returns the new θ_p."""
        n, theta = ctx.workers, state.theta[idx]
        x = ctx.flat.get()[idx]
        if self.precision == "float32":
            mean = ctx.comm.all_reduce_(x, group=ctx.workers_group).div_(n)
            delta = theta - mean
        else:
            sent = (theta - x).to(PRECISIONS[self.precision])
            delta = ctx.comm.all_reduce_(sent, group=ctx.workers_group).to(theta.dtype).div_(n)
            mean = theta - delta
        params = idx < ctx.flat.num_params  # buffers are averaged, not stepped
        v = state.velocity[idx]
        v[params] = self.outer_momentum * v[params] + delta[params]
        new = mean.clone()
        new[params] = (mean[params] + (1 - self.outer_lr) * delta[params]
                       - self.outer_lr * self.outer_momentum * v[params])
        state.velocity[idx] = v
        state.theta[idx] = new
        return new
