"""sgp: Stochastic Gradient Push (Assran, Loizou, Ballas, Rabbat 2019)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from distsgd import mixing, topology
from distsgd.algorithms.base import Algorithm, WorkerContext, hyperparameter
from distsgd.algorithms.registry import register
from distsgd.comm.base import Exchange
from distsgd.errors import UsageError


@dataclass
class PushSumState:
    x: torch.Tensor  # push-sum numerator
    w: float  # push-sum weight (float64, sent bit-exact)
    z: torch.Tensor  # de-biased model x / w, what the model holds between steps


@dataclass
class OverlapState(PushSumState):
    """Push-sum state of OSGP: also the shares this worker still expects, oldest first, each
    ``[step it was sent at, in-peer index, None]`` while on the wire, or with its payload in place
    of None once taken off the wire at a real-process checkpoint (a resumed process could not
    receive it) but not yet mixed in."""

    pending: list[list[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The receive under way of each share on the wire, by (step, in-peer), and its buffer:
        # transport objects, not state (a resumed run posts them again, in `pending`'s order).
        self.posted: dict[tuple[int, int], tuple[Exchange, torch.Tensor]] = {}


@register
@dataclass(frozen=True)
class SGP(Algorithm):
    """Push-sum gossip on a time-varying directed exponential graph.

    Each step: the optimizer's update, taken at z = x / w, is applied to x; then x and w are split
    into k + 1 equal parts, k sent to this step's out-peers and one kept, and what arrives is added.
    On this regular graph w stays 1, but it is carried exactly so that other graphs stay unbiased.

    With ``overlap`` (OSGP, the reference code's ``overlap=True``), the shares sent after step t
    are not waited for: their receives are posted ahead (`Comm.exchange_start`), the worker
    trains on from the part it kept, and adds a share once it has arrived, asking after each step;
    a share sent after step t is waited for after step t + 1 + ``synch_freq`` at the latest
    (``synch_freq=0``: one step of compute hides each exchange, and the result no longer depends
    on when messages arrive). The reference waits the same way, but starts no new exchange while
    one is outstanding; here every step sends, so the bytes of a run never depend on timing.
    `finish` waits for and adds every share still on the wire, so no mass is lost at the end.

    With ``--on-failure continue``, a worker keeps the share it would have sent to a dead out-peer
    and stops waiting for a dead in-peer. So no mass flows into the dead worker after its death
    is known: the survivors' Σw (and Σx) is the total minus exactly what the dead worker held
    and what was sent to it before then, and x/w stays a weighted average over the survivors.
    """

    name = "sgp"
    paper = "Assran, Loizou, Ballas, Rabbat 2019, 'Stochastic Gradient Push for distributed DL'"
    sends = "k messages of |x| (k = peers, default 1) every step"

    peers: int = hyperparameter(1, "out-peers per step; 2 gives the 1/3-weight variant", low=1)
    overlap: bool = hyperparameter(False, "OSGP: send in the background, mix in shares as they "
                                          "arrive instead of waiting for them every step")
    synch_freq: int = hyperparameter(0, "with overlap: steps a share may stay on the wire beyond "
                                        "the one it hides; then the receiver waits for it", low=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.synch_freq and not self.overlap:
            raise UsageError(f"sgp: synch_freq={self.synch_freq} needs overlap=true (without "
                             "overlap every share is mixed in at the step that sends it); valid "
                             "values without overlap: 0")

    def validate(self, workers: int, lr: float) -> list[str]:
        shifts = len(topology.exponential_shifts(workers))
        if workers > 1 and self.peers > shifts:
            raise UsageError(f"sgp: peers={self.peers} is out of range for {workers} workers: "
                             f"valid values lie in [1, {shifts}]")
        return []

    def init(self, ctx: WorkerContext) -> PushSumState:
        z = ctx.flat.get()
        if self.overlap:
            return OverlapState(x=z.clone(), w=1.0, z=z)
        return PushSumState(x=z.clone(), w=1.0, z=z)

    def after_step(self, ctx: WorkerContext, state: PushSumState) -> None:
        z_new = ctx.flat.get()
        state.x.add_(z_new - state.z)  # the local update, applied to the numerator
        n, me = ctx.workers, ctx.index
        if n > 1 and isinstance(state, OverlapState):
            self._take(ctx, state)  # earlier steps' shares, as the reference's query comes first
            for peer in topology.exponential_in_peers(me, ctx.step, n, self.peers):
                state.pending.append([ctx.step, peer, None])
                self._post(ctx, state, ctx.step, peer)  # posted before this step's sends
            self._push(ctx, state, n, me)
        elif n > 1:
            self._mix(ctx, state, n, me)
        state.z = mixing.debias(state.x, state.w)
        ctx.flat.set_(state.z)

    def finish(self, ctx: WorkerContext, state: PushSumState) -> None:
        if isinstance(state, OverlapState) and state.pending:
            self._take(ctx, state, wait=True)  # every sender has sent its last share by now
            state.z = mixing.debias(state.x, state.w)
            ctx.flat.set_(state.z)

    def state_dict(self, ctx: WorkerContext, state: PushSumState) -> Any:
        # Real processes lose what is on the wire when they end; the simulator checkpoints its
        # messages in flight itself. Every sender is at this step, so the shares have been sent.
        if isinstance(state, OverlapState) and ctx.comm.now() is None:
            taken = []
            for step, peer, payload in state.pending:
                if payload is None:
                    payload = self._receive(ctx, state, step, peer)
                    if payload is None:  # a dead in-peer's: its mass is gone, as when it is due
                        continue
                taken.append([step, peer, payload])
            state.pending = taken
        return super().state_dict(ctx, state)

    def _push(self, ctx: WorkerContext, state: PushSumState, n: int, me: int) -> None:
        """Send this step's shares without waiting, and keep one (those of dead out-peers too:
        ``--on-failure continue`` sends no mass into a dead worker)."""
        out_peers = topology.exponential_out_peers(me, ctx.step, n, self.peers)
        share, w_share = mixing.push_sum_share(state.x, state.w, len(out_peers) + 1)
        message = torch.cat([share, mixing.pack_weight(w_share, share.dtype, share.device)])
        unsent = ctx.comm.exchange_start(
            [(message, ctx.worker_ranks[peer]) for peer in out_peers], []).unsent
        kept = 1 + sum(ctx.worker_ranks[peer] in unsent for peer in out_peers)
        state.x, state.w = share.mul_(kept), w_share * kept

    def _mix(self, ctx: WorkerContext, state: PushSumState, n: int, me: int) -> None:
        """`_push` and the receives at once: the peers and sizes follow from the shared seed, so
        the receives are posted ahead (`Comm.exchange`); the sums are as with send and recv."""
        out_peers = topology.exponential_out_peers(me, ctx.step, n, self.peers)
        in_peers = topology.exponential_in_peers(me, ctx.step, n, self.peers)
        share, w_share = mixing.push_sum_share(state.x, state.w, len(out_peers) + 1)
        message = torch.cat([share, mixing.pack_weight(w_share, share.dtype, share.device)])
        slots = mixing.weight_slots(message.dtype)
        inboxes = [torch.empty_like(message) for _ in in_peers]
        unsent, unfilled = ctx.comm.exchange(
            [(message, ctx.worker_ranks[peer]) for peer in out_peers],
            [(inbox, ctx.worker_ranks[peer]) for inbox, peer in zip(inboxes, in_peers,
                                                                      strict=True)])
        kept = 1 + sum(ctx.worker_ranks[peer] in unsent for peer in out_peers)  # dead out-peers'
        state.x, state.w = share.mul_(kept), w_share * kept
        for inbox, peer in zip(inboxes, in_peers, strict=True):
            if ctx.worker_ranks[peer] in unfilled:  # a dead in-peer sends nothing; its mass is gone
                continue
            state.x.add_(inbox[:-slots])
            state.w += mixing.unpack_weight(inbox[-slots:])

    def _take(self, ctx: WorkerContext, state: OverlapState, wait: bool = False) -> None:
        """Add the expected shares that have arrived, oldest first; wait for those sent more than
        ``synch_freq`` + 1 steps ago (all of them with `wait`)."""
        slots = mixing.weight_slots(state.x.dtype)
        behind: set[int] = set()  # in-peers whose older share is still on the wire: FIFO per pair
        left = []
        for entry in state.pending:
            step, peer, payload = entry
            if payload is None:
                if peer in behind:
                    left.append(entry)
                    continue
                due = wait or ctx.step - step > self.synch_freq
                if not due and not self._arrived(ctx, state, step, peer):
                    behind.add(peer)
                    left.append(entry)
                    continue
                payload = self._receive(ctx, state, step, peer)
                if payload is None:  # a dead in-peer sends nothing more; its mass is gone
                    continue
            state.x.add_(payload[:-slots].to(state.x.device))
            state.w += mixing.unpack_weight(payload[-slots:].cpu())
        state.pending = left

    def _post(self, ctx: WorkerContext, state: OverlapState, step: int, peer: int) -> None:
        """Post the receive of in-peer `peer`'s share of step `step` (its size: x's and w's)."""
        x = state.x
        inbox = torch.empty(x.numel() + mixing.weight_slots(x.dtype), dtype=x.dtype,
                            device=x.device)
        handle = ctx.comm.exchange_start([], [(inbox, ctx.worker_ranks[peer])])
        state.posted[(step, peer)] = handle, inbox

    def _posted(self, ctx: WorkerContext, state: OverlapState, step: int,
                peer: int) -> tuple[Exchange, torch.Tensor]:
        """The receive of in-peer `peer`'s share of step `step` and its buffer (posted now, in
        `pending`'s order, if a resumed run has not posted it yet)."""
        if (step, peer) not in state.posted:
            for s, p, payload in state.pending:
                if payload is None and (s, p) not in state.posted:
                    self._post(ctx, state, s, p)
        return state.posted[(step, peer)]

    def _arrived(self, ctx: WorkerContext, state: OverlapState, step: int, peer: int) -> bool:
        """Whether in-peer `peer`'s share of step `step` is in."""
        return self._posted(ctx, state, step, peer)[0].done()

    def _receive(self, ctx: WorkerContext, state: OverlapState, step: int,
                 peer: int) -> torch.Tensor | None:
        """In-peer `peer`'s share of step `step`, waited for; None if the peer died
        (``--on-failure continue``)."""
        handle, inbox = self._posted(ctx, state, step, peer)
        del state.posted[(step, peer)]
        _, unfilled = handle.wait()
        return None if unfilled else inbox
