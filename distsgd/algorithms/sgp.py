"""sgp: Stochastic Gradient Push (Assran, Loizou, Ballas, Rabbat 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distsgd import mixing, topology
from distsgd.algorithms import register
from distsgd.algorithms.base import Algorithm, WorkerContext, hyperparameter
from distsgd.errors import PeerDied, UsageError


@dataclass
class PushSumState:
    x: torch.Tensor  # push-sum numerator
    w: float  # push-sum weight (float64, sent bit-exact)
    z: torch.Tensor  # de-biased model x / w, what the model holds between steps


@register
@dataclass(frozen=True)
class SGP(Algorithm):
    """Push-sum gossip on a time-varying directed exponential graph.

    Each step: the optimizer's update, taken at z = x / w, is applied to x; then x and w are split
    into k + 1 equal parts, k sent to this step's out-peers and one kept, and what arrives is added.
    On this regular graph w stays 1, but it is carried exactly so that other graphs stay unbiased.

    With ``--on-failure continue``, a worker keeps the share it would have sent to a dead out-peer
    and stops waiting for a dead in-peer. So no mass flows into the dead worker after its death
    is known: the survivors' Σw (and Σx) is the total minus exactly what the dead worker held
    and what was sent to it before then, and x/w stays a weighted average over the survivors.
    """

    name = "sgp"
    paper = "Assran, Loizou, Ballas, Rabbat 2019, 'Stochastic Gradient Push for distributed DL'"
    sends = "k messages of |x| (k = peers, default 1) every step"

    peers: int = hyperparameter(1, "out-peers per step; 2 gives the 1/3-weight variant", low=1)

    def validate(self, workers: int, lr: float) -> list[str]:
        shifts = len(topology.exponential_shifts(workers))
        if workers > 1 and self.peers > shifts:
            raise UsageError(f"sgp: peers={self.peers} is out of range for {workers} workers: "
                             f"valid values lie in [1, {shifts}]")
        return []

    def init(self, ctx: WorkerContext) -> PushSumState:
        z = ctx.flat.get()
        return PushSumState(x=z.clone(), w=1.0, z=z)

    def after_step(self, ctx: WorkerContext, state: PushSumState) -> None:
        z_new = ctx.flat.get()
        state.x.add_(z_new - state.z)  # the local update, applied to the numerator
        n, me = ctx.workers, ctx.index
        if n > 1:
            self._mix(ctx, state, n, me)
        state.z = mixing.debias(state.x, state.w)
        ctx.flat.set_(state.z)

    def _mix(self, ctx: WorkerContext, state: PushSumState, n: int, me: int) -> None:
        out_peers = topology.exponential_out_peers(me, ctx.step, n, self.peers)
        in_peers = topology.exponential_in_peers(me, ctx.step, n, self.peers)
        share, w_share = mixing.push_sum_share(state.x, state.w, len(out_peers) + 1)
        message = torch.cat([share, mixing.pack_weight(w_share, share.dtype, share.device)])
        kept = 1  # shares this worker keeps: its own, and those of dead out-peers
        for peer in out_peers:
            try:
                ctx.comm.send(message, ctx.worker_ranks[peer])
            except PeerDied:  # --on-failure continue: no mass is sent into a dead worker
                kept += 1
        state.x, state.w = share.mul_(kept), w_share * kept
        slots = mixing.weight_slots(share.dtype)
        inbox = torch.empty_like(message)
        for peer in in_peers:
            try:
                ctx.comm.recv(inbox, src=ctx.worker_ranks[peer])
            except PeerDied:  # a dead in-peer sends nothing more; its mass is gone
                continue
            state.x.add_(inbox[:-slots])
            state.w += mixing.unpack_weight(inbox[-slots:])
