"""gosgd: gossip training with random pushes and float64 weights (Blot et al. 2016)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from distsgd import mixing
from distsgd.algorithms.base import Algorithm, WorkerContext, hyperparameter
from distsgd.algorithms.registry import register
from distsgd.errors import PeerDied


@dataclass
class GossipState:
    weight: float  # a_i, float64: halvings and sums of dyadic fractions stay exact
    rng: np.random.Generator  # this worker's own coin and peer choice
    inbox: torch.Tensor  # a reusable receive buffer: x followed by the packed weight
    dead: set[int] = field(default_factory=set)  # worker indices known dead (--on-failure)


@register
@dataclass(frozen=True)
class GoSGD(Algorithm):
    """Each step: merge every waiting message (x_r, a_r) into (x_i, a_i) by weighted average,
    take a local SGD step, then with probability p halve a_i and send (x_i, a_i) to a random other
    worker without waiting. Σ a_i (messages in flight included) stays exactly 1, and without
    gradient steps Σ a_i x_i is conserved while every x_i converges to it.

    With ``--on-failure continue`` a worker stops choosing a peer once a push to it fails
    (`PeerDied`) and keeps the weight it meant to send; the mass the dead worker held or was
    sent is lost, and Σ a_i x_i / Σ a_i over the survivors stays their weighted average.
    """

    name = "gosgd"
    paper = "Blot, Picard, Cord, Thome 2016, 'Gossip training for deep learning' (GoSGD)"
    sends = "with probability p: one message of |x| to a random peer (p ≈ 2/τ matches EASGD)"
    synchronous = False

    p: float = hyperparameter(0.2, "probability of a push per step", low=0.0, high=1.0)

    def init(self, ctx: WorkerContext) -> GossipState:
        slots = mixing.weight_slots(ctx.flat.dtype)
        return GossipState(
            weight=1.0 / ctx.workers,
            rng=np.random.default_rng([ctx.seed, 0x605, ctx.index]),
            inbox=torch.empty(ctx.flat.numel + slots, dtype=ctx.flat.dtype,
                              device=ctx.flat.device))

    def after_step(self, ctx: WorkerContext, state: GossipState) -> None:
        x = ctx.flat.get()
        # Any other live worker; with none dead, the draw is the original one (any other worker).
        live = [i for i in range(ctx.workers) if i != ctx.index and i not in state.dead]
        if live and state.rng.random() < self.p:
            peer = live[int(state.rng.integers(len(live)))]
            state.weight /= 2
            message = torch.cat([x, mixing.pack_weight(state.weight, x.dtype, x.device)])
            try:
                ctx.comm.send(message, ctx.worker_ranks[peer])
            except PeerDied:
                state.weight *= 2  # nothing left: the half stays here (exact: a power of 2)
                state.dead.add(peer)
        # Merge what has arrived, so the next gradient is taken at the mixed point.
        slots = mixing.weight_slots(x.dtype)
        while ctx.comm.poll(state.inbox) is not None:
            a_r = mixing.unpack_weight(state.inbox[-slots:])
            x = mixing.weighted_average([x, state.inbox[:-slots]], [state.weight, a_r])
            state.weight += a_r
        ctx.flat.set_(x)

    def evaluated(self, ctx: WorkerContext, state: GossipState) -> tuple[torch.Tensor, float]:
        return ctx.flat.get(), state.weight
