"""The parameter-server core behind downpour, easgd-async, eamsgd, ssp and async-sparse.

A server rank holds one shard of the center variable x̃ (``shards`` servers split the flat model into
contiguous pieces), applies pushed updates in arrival order, counts versions (one per applied
update) and answers pulls with the version, so every push can carry the version it was computed
from and the server measures its staleness. It stops when every worker has said it is done.

Wire format, server-bound: a header of 4 float64 (kind, version, clock, count) then, for kinds
that carry one, a payload whose size the server derives from the header. Every reply is the shard
followed by the server's version and lowest worker clock as raw float64 bits. Per-pair FIFO order
keeps each header next to its payload without tags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from distsgd import checkpoint, mixing
from distsgd.algorithms.base import Algorithm, WorkerContext, hyperparameter
from distsgd.errors import PeerDied, ProtocolError

PUSH, PUSH_SPARSE, PULL, ELASTIC, DONE, SNAPSHOT, CHECKPOINT = range(1, 8)
HEADER = 4
HIST_BINS = 64  # staleness 0..63, then one bin for everything older
STATS = 4 + HIST_BINS + 1 + 1  # Shard.stats(): figures, histogram, the server's bytes sent


@dataclass
class Shard:
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
    rule: Any = None  # the algorithm's server-side state (momentum, running average)

    def min_clock(self) -> float:
        live = [self.clocks[w] for w in self.live]
        return min(live) if live else math.inf

    def record_staleness(self, pushed_version: int) -> int:
        tau = self.version - pushed_version
        self.staleness[min(tau, HIST_BINS)] += 1
        return tau

    def stats(self, bytes_sent: int) -> torch.Tensor:
        """Staleness figures as one float64 vector (count, sum, max, max clock gap, histogram),
        then `bytes_sent`, the server rank's own counted bytes (exact in float64 below 2^53)."""
        hist = torch.tensor(self.staleness, dtype=torch.float64)
        count = hist.sum()
        total = (hist[:HIST_BINS] * torch.arange(HIST_BINS, dtype=torch.float64)).sum() + (
            hist[HIST_BINS] * HIST_BINS)
        seen = [i for i, c in enumerate(self.staleness) if c]
        return torch.cat([torch.tensor([count, total, max(seen, default=0), self.max_gap],
                                       dtype=torch.float64), hist,
                          torch.tensor([float(bytes_sent)], dtype=torch.float64)])


def stats_dict(stats: torch.Tensor, clock_gap: bool) -> dict[str, Any]:
    """Staleness in server versions (updates applied between a worker's pull and its push), and
    the bytes the server ranks sent so far (their replies, which the workers' counts leave out)."""
    count = float(stats[0])
    hist = [int(c) for c in stats[4 : 4 + HIST_BINS + 1]]
    last = max((i for i, c in enumerate(hist) if c), default=-1)
    out = {"staleness_mean": float(stats[1]) / count if count else None,
           "staleness_max": int(stats[2]), "staleness_histogram": hist[: last + 1],
           "server_bytes_sent": int(stats[-1])}
    if clock_gap:
        out["ssp_max_clock_gap"] = float(stats[3])
    return out


@dataclass(frozen=True)
class ParameterServerAlgorithm(Algorithm):
    """Base of the server-based algorithms: the server loop, and what a push does to x̃."""

    synchronous = False
    bounded: ClassVar[bool] = False  # SSP: pulls wait for the slowest worker; report the gap
    shards: int = hyperparameter(1, "server ranks the parameters are sharded over", low=1)

    def servers(self, workers: int) -> int:
        return self.shards

    # ------------------------------------------------- the worker's side, shared by all
    def init(self, ctx: WorkerContext) -> ClientState:
        return start_client(ctx, self)

    def finish(self, ctx: WorkerContext, state: ClientState) -> None:
        state.client.done()

    def evaluated(self, ctx: WorkerContext, state: ClientState) -> tuple[torch.Tensor, float]:
        return evaluated_from_server(ctx, state)

    def metrics(self, ctx: WorkerContext, state: ClientState) -> dict[str, Any]:
        return state.figures

    def server_state_dicts(self, ctx: WorkerContext, state: ClientState) -> list[Any]:
        return state.client.server_states()

    # ----------------------------------------------------------- the server's decisions
    def server_init(self, shard: Shard, ctx: WorkerContext) -> Any:
        return None

    def apply(self, shard: Shard, update: torch.Tensor, tau: int, ctx: WorkerContext) -> None:
        """x̃ ← x̃ + update (DOWNPOUR); subclasses add momentum, decays, averages."""
        shard.x.add_(update)

    def server_evaluated(self, shard: Shard) -> torch.Tensor:
        return shard.x

    def moving_rate(self, workers: int) -> float:
        raise NotImplementedError(f"{self.name} has no elastic exchange")

    # ---------------------------------------------------------------- the server loop
    def serve(self, ctx: WorkerContext, saved: Any = None) -> dict[str, Any]:
        bounds = shard_bounds(ctx.flat.numel, len(ctx.server_ranks))
        a, b = bounds[ctx.server_ranks.index(ctx.rank)]
        shard = Shard(ctx.flat.get()[a:b].clone(), a, max(0, min(b, ctx.flat.num_params) - a),
                      ctx.worker_ranks, live=set(ctx.worker_ranks),
                      clocks=dict.fromkeys(ctx.worker_ranks, 0.0))
        shard.rule = self.server_init(shard, ctx)
        comm = ctx.comm
        if saved is not None:  # a resumed run: x̃, version, clocks, histogram, momentum, averages
            checkpoint.restore(shard, saved["shard"])
            comm.restore_counts(saved["bytes_by_verb"])  # (the simulator restores its own later)
        comm.expose("ps", lambda: (self.server_evaluated(shard).clone(),
                                   shard.stats(comm.bytes_sent)))
        comm.expose("ps-checkpoint", lambda: _server_state(comm, shard))
        header = torch.empty(HEADER, dtype=torch.float64)
        while shard.live:
            try:
                src = comm.recv(header, src=None)
            except PeerDied as e:  # --on-failure continue: stop waiting for the dead worker
                self._drop(comm, shard, e.rank)
                continue
            kind, version, clock, count = self._check_header(header, shard, src, ctx.rank)
            if kind in (PUSH, PUSH_SPARSE):
                update = self._receive_update(ctx, shard, src, kind, count)
                if update is None:  # its sender died between header and payload
                    continue
                tau = shard.record_staleness(version)
                self.apply(shard, update, tau, ctx)
                shard.version += 1
                shard.clocks[src] = clock
            elif kind == PULL:
                shard.deferred.append((src, clock))
            elif kind == ELASTIC:
                x = torch.empty_like(shard.x)
                try:
                    comm.recv(x, src=src)
                    _reply(comm, src, shard, shard.x)
                except PeerDied as e:
                    self._drop(comm, shard, e.rank)
                    continue
                shard.record_staleness(version)
                shard.x.add_(mixing.elastic_difference(x, shard.x, self.moving_rate(ctx.workers)))
                shard.version += 1
            elif kind == DONE:
                shard.live.discard(src)
            elif kind == SNAPSHOT:
                with comm.uncounted():
                    _reply(comm, src, shard, self.server_evaluated(shard))
                    comm.send(shard.stats(comm.bytes_sent), src)
            elif kind == CHECKPOINT:  # real processes: the workers are all at a checkpoint step
                blob = checkpoint.to_bytes(_server_state(comm, shard))
                with comm.uncounted():
                    comm.send(torch.tensor([float(blob.numel())], dtype=torch.float64), src)
                    comm.send(blob, src)
            else:
                raise ProtocolError(f"server rank {ctx.rank} rejected a header from rank {src}: "
                                    f"unknown kind {kind}")
            self._answer_pulls(comm, shard)
        return stats_dict(shard.stats(comm.bytes_sent), self.bounded)

    def _receive_update(self, ctx: WorkerContext, shard: Shard, src: int, kind: int,
                        count: int) -> torch.Tensor | None:
        """The update announced by a header from `src`; None if `src` died meanwhile."""
        payload = torch.empty_like(shard.x) if kind == PUSH else torch.empty(
            2 * count, dtype=shard.x.dtype, device=shard.x.device)
        try:
            ctx.comm.recv(payload, src=src)
        except PeerDied as e:
            self._drop(ctx.comm, shard, e.rank)
            return None
        if kind == PUSH:
            return payload
        values, indices = mixing.unpack_sparse(payload)
        if count and not (0 <= int(indices.min()) and int(indices.max()) < shard.x.numel()):
            raise ProtocolError(f"server {ctx.rank}: a sparse push from rank {src} has indices "
                                f"outside its shard of {shard.x.numel()} elements")
        return mixing.densify(indices, values, shard.x.numel())

    def _check_header(self, header: torch.Tensor, shard: Shard, src: int,
                      rank: int) -> tuple[int, int, float, int]:
        """(kind, version, clock, count), or ProtocolError naming the sender: the header is
        all a worker controls, so it is checked before it sizes or indexes anything."""
        kind, version, clock, count = header.tolist()
        problem = ""
        if not all(math.isfinite(v) and v == int(v) for v in (kind, version, count)):
            problem = f"kind, version and count must be whole numbers, not {header.tolist()}"
        elif not 0 <= version <= shard.version:
            problem = f"version {int(version)} is outside 0..{shard.version} (this server's)"
        elif not 0 <= count <= shard.x.numel():
            problem = f"count {int(count)} is outside 0..{shard.x.numel()} (the shard's size)"
        elif math.isnan(clock):
            problem = "its clock is NaN"
        if problem:
            raise ProtocolError(f"server rank {rank} rejected a header from rank {src}: "
                                f"{problem}")
        return int(kind), int(version), clock, int(count)

    def _drop(self, comm: Any, shard: Shard, worker: int) -> None:
        """Forget a dead worker (--on-failure continue): the server stops waiting for it, and
        SSP's bound (the lowest clock of the live workers) no longer counts it."""
        shard.live.discard(worker)
        shard.deferred = [(w, c) for w, c in shard.deferred if w != worker]
        self._answer_pulls(comm, shard)

    def _answer_pulls(self, comm: Any, shard: Shard) -> None:
        """Answer the pulls whose staleness bound the slowest live worker now allows."""
        lowest = shard.min_clock()
        waiting = []
        for worker, needed in shard.deferred:
            if lowest >= needed:
                shard.max_gap = max(shard.max_gap, shard.clocks[worker] - lowest
                                    if math.isfinite(lowest) else 0.0)
                try:
                    _reply(comm, worker, shard, shard.x)
                except PeerDied:  # it died waiting; the next loop forgets it
                    shard.live.discard(worker)
            else:
                waiting.append((worker, needed))
        shard.deferred = waiting


def _server_state(comm: Any, shard: Shard) -> dict[str, Any]:
    """What a checkpoint keeps of a server: its shard and bookkeeping, and its byte counts."""
    return {"shard": checkpoint.capture(shard), "bytes_by_verb": comm.bytes_by_verb}


def _reply(comm: Any, dst: int, shard: Shard, x: torch.Tensor) -> None:
    lowest = shard.min_clock()
    tail = torch.tensor([float(shard.version), lowest if math.isfinite(lowest) else -1.0],
                        dtype=torch.float64, device=x.device)
    comm.send(torch.cat([x, tail.view(x.dtype)]), dst)


def shard_bounds(numel: int, shards: int) -> list[tuple[int, int]]:
    return mixing.equal_segments(numel, min(shards, numel))


class PSClient:
    """A worker's side of the protocol: push, pull, elastic exchange, goodbye."""

    def __init__(self, ctx: WorkerContext, algorithm: ParameterServerAlgorithm) -> None:
        self.ctx, self.algorithm = ctx, algorithm
        self.bounds = shard_bounds(ctx.flat.numel, len(ctx.server_ranks))
        self.versions = [0] * len(self.bounds)
        self.min_clock = 0.0  # the lowest worker clock the last pull reported
        self.slots = 2 * mixing.weight_slots(ctx.flat.dtype)

    def _header(self, server: int, kind: int, clock: float = 0.0, count: int = 0) -> None:
        header = torch.tensor([kind, self.versions[server], clock, count], dtype=torch.float64)
        self.ctx.comm.send(header, self.ctx.server_ranks[server])

    def push(self, update: torch.Tensor, clock: float = 0.0) -> None:
        for i, (a, b) in enumerate(self.bounds):
            self._header(i, PUSH, clock)
            self.ctx.comm.send(update[a:b], self.ctx.server_ranks[i])

    def push_sparse(self, indices: torch.Tensor, values: torch.Tensor, clock: float = 0.0) -> None:
        """Send a sparse update as (values, indices) per shard: 8 bytes per kept entry."""
        for i, (a, b) in enumerate(self.bounds):
            keep = (indices >= a) & (indices < b)
            self._header(i, PUSH_SPARSE, clock, int(keep.sum()))
            payload = mixing.pack_sparse(indices[keep] - a, values[keep])
            self.ctx.comm.send(payload, self.ctx.server_ranks[i])

    def pull(self, needed_clock: float = -math.inf) -> torch.Tensor:
        """x̃, assembled from every shard; blocks while the bound on `needed_clock` holds it."""
        for i in range(len(self.bounds)):
            self._header(i, PULL, needed_clock)
        return self._collect()

    def elastic(self, x: torch.Tensor) -> torch.Tensor:
        """Send x; get x̃ as it was before the server moved it by α(x − x̃)."""
        for i, (a, b) in enumerate(self.bounds):
            self._header(i, ELASTIC)
            self.ctx.comm.send(x[a:b], self.ctx.server_ranks[i])
        return self._collect()

    def _collect(self) -> torch.Tensor:
        out = torch.empty(self.ctx.flat.numel, dtype=self.ctx.flat.dtype,
                          device=self.ctx.flat.device)
        lowest = math.inf
        for i, (a, b) in enumerate(self.bounds):
            reply = torch.empty(b - a + self.slots, dtype=out.dtype, device=out.device)
            self.ctx.comm.recv(reply, src=self.ctx.server_ranks[i])
            out[a:b] = reply[: b - a]
            version, clock = reply[b - a :].clone().view(torch.float64).tolist()
            self.versions[i] = int(version)
            lowest = min(lowest, clock if clock >= 0 else math.inf)
        self.min_clock = lowest
        return out

    def done(self) -> None:
        for i in range(len(self.bounds)):
            self._header(i, DONE)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"versions": list(self.versions), "min_clock": self.min_clock}

    def restore_checkpoint_state(self, saved: dict[str, Any]) -> None:
        self.versions, self.min_clock = list(saved["versions"]), saved["min_clock"]

    def server_states(self) -> list[Any]:
        """Every server's state, outside the byte counts: read in place in the simulator, asked
        for by message on real processes (where every worker is at the checkpoint barrier)."""
        comm, states = self.ctx.comm, []
        for rank in self.ctx.server_ranks:
            seen = comm.observe(rank, "ps-checkpoint")
            if seen is None:
                with comm.uncounted():
                    comm.send(torch.tensor([CHECKPOINT, 0, 0, 0], dtype=torch.float64), rank)
                    size = torch.empty(1, dtype=torch.float64)
                    comm.recv(size, src=rank)
                    blob = torch.empty(int(size), dtype=torch.uint8)
                    comm.recv(blob, src=rank)
                seen = checkpoint.from_bytes(blob)
            states.append(seen)
        return states

    def snapshot(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """The server's evaluated model and staleness figures, outside the byte counts.

        In the simulator the servers' state is read in place (no message, no virtual time), so
        evaluating never changes a run; on real processes it is a request like a pull.
        """
        comm = self.ctx.comm
        parts, stats = [], []
        for i, (a, b) in enumerate(self.bounds):
            seen = comm.observe(self.ctx.server_ranks[i], "ps")
            if seen is None:
                with comm.uncounted():
                    self._header(i, SNAPSHOT)
                    reply = torch.empty(b - a + self.slots, dtype=self.ctx.flat.dtype,
                                        device=self.ctx.flat.device)
                    comm.recv(reply, src=self.ctx.server_ranks[i])
                    figures = torch.empty(STATS, dtype=torch.float64)
                    comm.recv(figures, src=self.ctx.server_ranks[i])
                seen = (reply[: b - a], figures)
            parts.append(seen[0])
            stats.append(seen[1])
        total = torch.stack(stats).sum(0)  # counts, histograms and server bytes add up
        total[2] = max(float(s[2]) for s in stats)
        total[3] = max(float(s[3]) for s in stats)
        algorithm = self.algorithm
        return torch.cat(parts), stats_dict(total, algorithm.bounded)


@dataclass
class ClientState:
    client: PSClient
    anchor: torch.Tensor  # x as last pulled: a worker's update is its distance from here
    figures: dict[str, Any] = field(default_factory=dict)
    extra: Any = None


def start_client(ctx: WorkerContext, algorithm: ParameterServerAlgorithm) -> ClientState:
    """Connect to the servers and start from x̃."""
    client = PSClient(ctx, algorithm)
    x = client.pull()
    ctx.flat.set_(x)
    return ClientState(client, x.clone())


def evaluated_from_server(ctx: WorkerContext, state: ClientState) -> tuple[torch.Tensor, float]:
    """Worker 0 fetches the server's model; the others contribute nothing (weight 0)."""
    if ctx.index != 0:
        return ctx.flat.get(), 0.0
    x, state.figures = state.client.snapshot()
    return x, 1.0


def merge_figures(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """The staleness figures of several server shards as one set."""
    if len(figures) == 1:
        return figures[0]
    width = max(len(f["staleness_histogram"]) for f in figures)
    hist = [sum(f["staleness_histogram"][i] if i < len(f["staleness_histogram"]) else 0
                for f in figures) for i in range(width)]
    count = sum(hist)
    total = sum((f["staleness_mean"] or 0.0) * sum(f["staleness_histogram"]) for f in figures)
    merged = {"staleness_mean": total / count if count else None,
              "staleness_max": max(f["staleness_max"] for f in figures),
              "staleness_histogram": hist,
              "server_bytes_sent": sum(f["server_bytes_sent"] for f in figures)}
    if "ssp_max_clock_gap" in figures[0]:
        merged["ssp_max_clock_gap"] = max(f["ssp_max_clock_gap"] for f in figures)
    return merged
