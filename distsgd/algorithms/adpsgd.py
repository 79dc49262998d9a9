"""adpsgd: Asynchronous Decentralized Parallel SGD (Lian, Zhang, Zhang, Liu 2018, ICML)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from distsgd.algorithms.base import Algorithm, WorkerContext
from distsgd.algorithms.registry import register
from distsgd.errors import PeerDied

# The last slot of every message says what it is: one layout for all, as recv requires.
REQUEST, REPLY, DONE = 1.0, 2.0, 3.0


@dataclass
class PairState:
    active: bool  # even worker indices start exchanges, odd ones answer (bipartite: no deadlock)
    rng: np.random.Generator  # an active worker's own choice of passive peer
    inbox: torch.Tensor  # a reusable receive buffer: |x| values and the kind slot
    waiting: int = -1  # an active's passive (worker index) whose reply is due; -1: none
    done: set[int] = field(default_factory=set)  # a passive's actives that said goodbye
    dead: set[int] = field(default_factory=set)  # worker indices known dead (--on-failure)


@register
@dataclass(frozen=True)
class ADPSGD(Algorithm):
    """Each worker, without waiting for any other: gradient g on its model x; pairwise average
    with one random neighbour; x ← x − ηg (the optimizer's step, applied to the averaged model).

    Workers form a bipartite graph, as in the paper: even worker indices are active, odd ones
    passive, and every active may pick any passive. An active sends x_a; the passive, when it
    next looks (between its steps), computes d = (x_p − x_a)/2, moves to x_p − d and replies d;
    the active adds d when the reply has arrived. The average is atomic at the passive (read,
    average, write in one go) and the pair's sum is conserved; updates the active made while its
    request travelled stay on top, which is the gradient staleness the paper's analysis allows.
    No worker ever blocks on another while training (an active starts its next exchange once the
    reply is in), so no exchange can deadlock against the evaluation's collectives on real
    processes. At the end an active waits for its last reply and says goodbye to every passive;
    a passive keeps answering until every active has said goodbye (or died).

    With ``--on-failure continue``, as gosgd: a request or reply to a dead peer is not sent and
    nothing moves (the pair's sum stays whole); a passive stops waiting for a dead active. An
    active whose passive died with its request learns it from ``poll`` (`PeerDied`, as recv
    raises it) and asks another passive at its next step, rather than waiting for a reply that
    will never come (its own model is whole: a reply is only ever added).
    """

    name = "adpsgd"
    paper = "Lian, Zhang, Zhang, Liu 2018, 'Asynchronous Decentralized Parallel SGD' (AD-PSGD)"
    sends = "active: |x| to a random passive per exchange; passive: |x| back (about 1 a step)"
    synchronous = False

    def init(self, ctx: WorkerContext) -> PairState:
        return PairState(
            active=ctx.index % 2 == 0,
            rng=np.random.default_rng([ctx.seed, 0xAD, ctx.index]),
            inbox=torch.empty(ctx.flat.numel + 1, dtype=ctx.flat.dtype, device=ctx.flat.device))

    def after_backward(self, ctx: WorkerContext, state: PairState) -> None:
        # Between backward and the optimizer step: the gradient was taken on the model before the
        # average and is applied to the averaged one (the paper's order).
        if ctx.workers == 1:
            return
        if state.active:
            self._exchange(ctx, state)
        else:
            self._answer(ctx, state, block=False)

    def _exchange(self, ctx: WorkerContext, state: PairState) -> None:
        if state.waiting >= 0:
            try:
                if ctx.comm.poll(state.inbox, src=ctx.worker_ranks[state.waiting]) is None:
                    return  # the reply is on its way: train on, exchange again once it is in
                self._apply_reply(ctx, state)
            except PeerDied:  # the passive died before replying: ask another one at once
                state.dead.add(state.waiting)
                state.waiting = -1
        passives = [i for i in range(1, ctx.workers, 2) if i not in state.dead]
        if not passives:
            return
        peer = passives[int(state.rng.integers(len(passives)))]
        try:
            ctx.comm.send(self._message(ctx.flat.get(), REQUEST), ctx.worker_ranks[peer])
            state.waiting = peer
        except PeerDied:
            state.dead.add(peer)

    def _apply_reply(self, ctx: WorkerContext, state: PairState) -> None:
        ctx.flat.set_(ctx.flat.get().add_(state.inbox[:-1]))
        state.waiting = -1

    def _answer(self, ctx: WorkerContext, state: PairState, block: bool) -> None:
        """Serve every request that has arrived (`block`: wait for messages until every active
        has said goodbye or died)."""
        actives = set(range(0, ctx.workers, 2))
        while True:
            if block:
                if actives <= state.done | state.dead:
                    return
                try:
                    src = ctx.comm.recv(state.inbox)
                except PeerDied as e:  # an active died: it will send nothing more
                    state.dead.add(ctx.worker_ranks.index(e.rank) if e.rank in ctx.worker_ranks
                                   else -1)
                    continue
            else:
                got = ctx.comm.poll(state.inbox)
                if got is None:
                    return
                src = got
            sender = ctx.worker_ranks.index(src)
            if float(state.inbox[-1]) == DONE:
                state.done.add(sender)
                continue
            x = ctx.flat.get()
            d = (x - state.inbox[:-1]).div_(2)
            try:
                ctx.comm.send(self._message(d, REPLY), src)
            except PeerDied:  # the active is gone: nothing moves, the pair's sum stays whole
                state.dead.add(sender)
                continue
            ctx.flat.set_(x.sub_(d))

    @staticmethod
    def _message(values: torch.Tensor, kind: float) -> torch.Tensor:
        return torch.cat([values, torch.tensor([kind], dtype=values.dtype, device=values.device)])

    def finish(self, ctx: WorkerContext, state: PairState) -> None:
        if ctx.workers == 1:
            return
        if not state.active:
            self._answer(ctx, state, block=True)
            return
        if state.waiting >= 0:
            try:
                ctx.comm.recv(state.inbox, src=ctx.worker_ranks[state.waiting])
                self._apply_reply(ctx, state)
            except PeerDied:
                state.dead.add(state.waiting)
                state.waiting = -1
        goodbye = torch.zeros(ctx.flat.numel + 1, dtype=ctx.flat.dtype, device=ctx.flat.device)
        goodbye[-1] = DONE
        for peer in range(1, ctx.workers, 2):
            if peer not in state.dead:
                try:
                    ctx.comm.send(goodbye, ctx.worker_ranks[peer])
                except PeerDied:
                    state.dead.add(peer)
