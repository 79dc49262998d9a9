"""The server side: a shard of x̃ and its bookkeeping, and the loop that serves it.

A server rank holds one shard of the center variable x̃ (``shards`` servers split the flat model
into contiguous pieces), applies pushed updates in arrival order, counts versions (one per applied
update) and answers pulls with the version, so every push carries the version it was computed from
and the server measures its staleness. SSP's pulls are held until the slowest live worker's clock
allows them. The server stops when every live worker has said it is done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Generic, TypeVar

import torch

from distsgd import mixing
from distsgd.algorithms.context import WorkerContext
from distsgd.algorithms.hooks import ServerRole
from distsgd.algorithms.ps import wire
from distsgd.algorithms.ps.staleness import HIST_BINS, stats_dict, stats_vector
from distsgd.checkpoint import walk as checkpoint
from distsgd.comm.base import Comm
from distsgd.errors import PeerDied, ProtocolError

R = TypeVar("R")  # an algorithm's server-side state: momentum, running averages


@dataclass
class Shard(Generic[R]):
    """One server's share of x̃ and its bookkeeping."""

    x: torch.Tensor
    start: int  # offset of this shard in the flat model
    num_params: int  # how many of its elements are parameters (the rest are float buffers)
    workers: tuple[int, ...]
    version: int = 0
    clocks: dict[int, float] = field(default_factory=dict)  # pushes received (SSP clocks)
    live: set[int] = field(default_factory=set)
    staleness: list[int] = field(default_factory=lambda: [0] * (HIST_BINS + 1))
    max_gap: float = 0.0  # largest clock gap seen when answering a pull
    deferred: list[tuple[int, float]] = field(default_factory=list)  # (worker, clock needed)
    rule: R | None = None  # the algorithm's server-side state (`ParameterServer.server_init`)

    def min_clock(self) -> float:
        live = [self.clocks[w] for w in self.live]
        return min(live) if live else math.inf

    def record_staleness(self, pushed_version: int) -> int:
        tau = self.version - pushed_version
        self.staleness[min(tau, HIST_BINS)] += 1
        return tau

    def stats(self, bytes_sent: int) -> torch.Tensor:
        """Staleness figures and `bytes_sent`, the server rank's own counted bytes, as one
        float64 vector (`staleness.stats_vector`)."""
        return stats_vector(self.staleness, self.max_gap, bytes_sent)

    def checked_rule(self) -> R:
        """`rule`, which `server_init` has set by the time the server applies anything."""
        if self.rule is None:
            raise RuntimeError("the shard's server rule is used before server_init set it")
        return self.rule


class ParameterServer(ServerRole, Generic[R]):
    """The server role of the parameter-server algorithms: the loop, and what a push does to x̃.

    Subclasses decide `server_init`, `apply` and `server_evaluated`; `service` answers the
    requests outside the paper's protocol (`wire.SERVICES`)."""

    shards: int  # a hyperparameter of the algorithm that composes this role
    bounded: ClassVar[bool] = False  # SSP: pulls wait for the slowest worker; report the gap

    def servers(self, workers: int) -> int:
        return self.shards

    # ----------------------------------------------------------- the server's decisions
    def server_init(self, shard: Shard[R], ctx: WorkerContext) -> R | None:
        return None

    def apply(self, shard: Shard[R], update: torch.Tensor, tau: int, ctx: WorkerContext) -> None:
        """x̃ ← x̃ + update (DOWNPOUR); subclasses add momentum, decays, averages."""
        shard.x.add_(update)

    def server_evaluated(self, shard: Shard[R]) -> torch.Tensor:
        return shard.x

    def moving_rate(self, workers: int) -> float:
        raise NotImplementedError(f"{self.name} has no elastic exchange")

    def service(self, request: str, shard: Shard[R], comm: Comm) -> Any:
        """The answer to a request outside the training protocol: ``snapshot`` (the evaluated
        model and the staleness figures) or ``checkpoint`` (the shard, bookkeeping and byte
        counts). Read in place in the simulator; a SERVICE message on real processes."""
        if request == "snapshot":
            return self.server_evaluated(shard).clone(), shard.stats(comm.bytes_sent)
        if request == "checkpoint":
            return {"shard": checkpoint.capture(shard), "bytes_by_verb": comm.bytes_by_verb}
        raise ValueError(f"unknown service request {request!r}; valid: {', '.join(wire.SERVICES)}")

    # ---------------------------------------------------------------- the server loop
    def serve(self, ctx: WorkerContext, saved: Any = None) -> dict[str, Any]:
        bounds = wire.shard_bounds(ctx.flat.numel, len(ctx.server_ranks))
        a, b = bounds[ctx.server_ranks.index(ctx.rank)]
        shard: Shard[R] = Shard(ctx.flat.get()[a:b].clone(), a,
                                max(0, min(b, ctx.flat.num_params) - a), ctx.worker_ranks,
                                live=set(ctx.worker_ranks),
                                clocks=dict.fromkeys(ctx.worker_ranks, 0.0))
        shard.rule = self.server_init(shard, ctx)
        comm = ctx.comm
        if saved is not None:  # a resumed run: x̃, version, clocks, histogram, momentum, averages
            checkpoint.restore(shard, saved["shard"])
            comm.restore_counts(saved["bytes_by_verb"])  # (the simulator restores its own later)
        for request in wire.SERVICES:
            comm.expose(f"ps.{request}", partial(self.service, request, shard, comm))
        raw = torch.empty(wire.HEADER, dtype=torch.float64)
        while shard.live:
            try:
                src = comm.recv(raw, src=None)
            except PeerDied as e:  # --on-failure continue: stop waiting for the dead worker
                self._drop(comm, shard, e.rank)
                continue
            head = wire.check_header(raw, version=shard.version, size=shard.x.numel(), src=src,
                                     rank=ctx.rank)
            if head.kind in (wire.PUSH, wire.PUSH_SPARSE):
                update = self._receive_update(ctx, shard, src, head)
                if update is None:  # its sender died between header and payload
                    continue
                tau = shard.record_staleness(head.version)
                self.apply(shard, update, tau, ctx)
                shard.version += 1
                shard.clocks[src] = head.clock
            elif head.kind == wire.PULL:
                shard.deferred.append((src, head.clock))
            elif head.kind == wire.ELASTIC:
                if not self._elastic(ctx, shard, src, head):
                    continue
            elif head.kind == wire.DONE:
                shard.live.discard(src)
            else:  # SERVICE, outside the byte counts
                with comm.uncounted():
                    answer = self.service(wire.SERVICES[head.number], shard, comm)
                    wire.send_service_reply(comm, src, answer)
            self._answer_pulls(comm, shard)
        return stats_dict(shard.stats(comm.bytes_sent), self.bounded)

    def _elastic(self, ctx: WorkerContext, shard: Shard[R], src: int, head: wire.Header) -> bool:
        """Answer with x̃ as it is, then move it by α(x − x̃); False if `src` died meanwhile."""
        x = torch.empty_like(shard.x)
        try:
            ctx.comm.recv(x, src=src)
            ctx.comm.send(wire.pack_reply(shard.x, shard.version, shard.min_clock()), src)
        except PeerDied as e:
            self._drop(ctx.comm, shard, e.rank)
            return False
        shard.record_staleness(head.version)
        shard.x.add_(mixing.elastic_difference(x, shard.x, self.moving_rate(ctx.workers)))
        shard.version += 1
        return True

    def _receive_update(self, ctx: WorkerContext, shard: Shard[R], src: int,
                        head: wire.Header) -> torch.Tensor | None:
        """The update announced by a header from `src`; None if `src` died meanwhile."""
        dense = head.kind == wire.PUSH
        payload = torch.empty_like(shard.x) if dense else torch.empty(
            2 * head.number, dtype=shard.x.dtype, device=shard.x.device)
        try:
            ctx.comm.recv(payload, src=src)
        except PeerDied as e:
            self._drop(ctx.comm, shard, e.rank)
            return None
        if dense:
            return payload
        values, indices = mixing.unpack_sparse(payload)
        if head.number and not (0 <= int(indices.min()) and int(indices.max()) < shard.x.numel()):
            raise ProtocolError(f"server {ctx.rank}: a sparse push from rank {src} has indices "
                                f"outside its shard of {shard.x.numel()} elements")
        return mixing.densify(indices, values, shard.x.numel())

    def _drop(self, comm: Comm, shard: Shard[R], worker: int) -> None:
        """Forget a dead worker (--on-failure continue): the server stops waiting for it, and
        SSP's bound (the lowest clock of the live workers) no longer counts it."""
        shard.live.discard(worker)
        shard.deferred = [(w, c) for w, c in shard.deferred if w != worker]
        self._answer_pulls(comm, shard)

    def _answer_pulls(self, comm: Comm, shard: Shard[R]) -> None:
        """Answer the pulls whose staleness bound the slowest live worker now allows."""
        lowest = shard.min_clock()
        waiting = []
        for worker, needed in shard.deferred:
            if lowest >= needed:
                shard.max_gap = max(shard.max_gap, shard.clocks[worker] - lowest
                                    if math.isfinite(lowest) else 0.0)
                try:
                    # min_clock again: a worker that died waiting left the live set
                    comm.send(wire.pack_reply(shard.x, shard.version, shard.min_clock()), worker)
                except PeerDied:  # it died waiting; the next loop forgets it
                    shard.live.discard(worker)
            else:
                waiting.append((worker, needed))
        shard.deferred = waiting
