"""A worker's side of the parameter-server protocol: push, pull, elastic exchange, goodbye, and
the out-of-protocol service requests (the evaluated model, the servers' checkpoint state)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from distsgd import mixing
from distsgd.algorithms.context import WorkerContext
from distsgd.algorithms.ps import wire
from distsgd.algorithms.ps.staleness import stats_dict, sum_stats


class PSClient:
    """One worker's connection to every server shard: the versions it last saw of each."""

    def __init__(self, ctx: WorkerContext, bounded: bool = False) -> None:
        self.ctx, self.bounded = ctx, bounded  # bounded (SSP): the figures report the clock gap
        self.bounds = wire.shard_bounds(ctx.flat.numel, len(ctx.server_ranks))
        self.versions = [0] * len(self.bounds)
        self.min_clock = 0.0  # the lowest worker clock the last pull reported
        self.slots = wire.tail_slots(ctx.flat.dtype)

    def _header(self, server: int, kind: int, clock: float = 0.0, count: int = 0) -> None:
        self.ctx.comm.send(wire.header(kind, self.versions[server], clock, count),
                           self.ctx.server_ranks[server])

    def push(self, update: torch.Tensor, clock: float = 0.0) -> None:
        for i, (a, b) in enumerate(self.bounds):
            self._header(i, wire.PUSH, clock)
            self.ctx.comm.send(update[a:b], self.ctx.server_ranks[i])

    def push_sparse(self, indices: torch.Tensor, values: torch.Tensor, clock: float = 0.0) -> None:
        """Send a sparse update as (values, indices) per shard: 8 bytes per kept entry."""
        for i, (a, b) in enumerate(self.bounds):
            keep = (indices >= a) & (indices < b)
            self._header(i, wire.PUSH_SPARSE, clock, int(keep.sum()))
            payload = mixing.pack_sparse(indices[keep] - a, values[keep])
            self.ctx.comm.send(payload, self.ctx.server_ranks[i])

    def pull(self, needed_clock: float = -math.inf) -> torch.Tensor:
        """x̃, assembled from every shard; blocks while the bound on `needed_clock` holds it."""
        for i in range(len(self.bounds)):
            self._header(i, wire.PULL, needed_clock)
        return self._collect()

    def elastic(self, x: torch.Tensor) -> torch.Tensor:
        """Send x; get x̃ as it was before the server moved it by α(x − x̃)."""
        for i, (a, b) in enumerate(self.bounds):
            self._header(i, wire.ELASTIC)
            self.ctx.comm.send(x[a:b], self.ctx.server_ranks[i])
        return self._collect()

    def _collect(self) -> torch.Tensor:
        flat = self.ctx.flat
        out = torch.empty(flat.numel, dtype=flat.dtype, device=flat.device)
        lowest = math.inf
        for i, (a, b) in enumerate(self.bounds):
            reply = torch.empty(b - a + self.slots, dtype=out.dtype, device=out.device)
            self.ctx.comm.recv(reply, src=self.ctx.server_ranks[i])
            out[a:b], self.versions[i], clock = wire.unpack_reply(reply, b - a)
            lowest = min(lowest, clock)
        self.min_clock = lowest
        return out

    def done(self) -> None:
        for i in range(len(self.bounds)):
            self._header(i, wire.DONE)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"versions": list(self.versions), "min_clock": self.min_clock}

    def restore_checkpoint_state(self, saved: dict[str, Any]) -> None:
        self.versions, self.min_clock = list(saved["versions"]), saved["min_clock"]

    # ------------------------------------------------- service requests, outside the counts
    def service(self, server: int, request: str) -> Any:
        """Server `server`'s answer to `request` (`wire.SERVICES`), outside the byte counts: read
        in place in the simulator (no message, no virtual time, so measuring never changes a
        run); on real processes a SERVICE message, like a pull."""
        comm, rank = self.ctx.comm, self.ctx.server_ranks[server]
        seen = comm.observe(rank, f"ps.{request}")
        if seen is not None:
            return seen
        with comm.uncounted():
            self._header(server, wire.SERVICE, count=wire.SERVICES.index(request))
            return wire.recv_service_reply(comm, rank)

    def server_states(self) -> list[Any]:
        """Every server's state for a checkpoint (on real processes every worker is at the
        checkpoint barrier, so no request of theirs is outstanding)."""
        return [self.service(i, "checkpoint") for i in range(len(self.bounds))]

    def snapshot(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """The servers' evaluated model and staleness figures."""
        flat = self.ctx.flat
        parts, stats = [], []
        for i in range(len(self.bounds)):
            x, figures = self.service(i, "snapshot")
            parts.append(x.to(device=flat.device))
            stats.append(figures)
        return torch.cat(parts), stats_dict(sum_stats(stats), self.bounded)


@dataclass
class ClientState:
    """A parameter-server worker's state; algorithms with more of their own subclass it."""

    client: PSClient
    anchor: torch.Tensor  # x as last pulled: a worker's update is its distance from here
    figures: dict[str, Any] = field(default_factory=dict)  # the servers' last snapshot figures


def connect(ctx: WorkerContext, bounded: bool = False) -> tuple[PSClient, torch.Tensor]:
    """Connect to the servers and start from x̃: (the client, x̃ as pulled)."""
    client = PSClient(ctx, bounded)
    x = client.pull()
    ctx.flat.set_(x)
    return client, x.clone()


def start_client(ctx: WorkerContext, bounded: bool = False) -> ClientState:
    return ClientState(*connect(ctx, bounded))


def evaluated_from_server(ctx: WorkerContext, state: ClientState) -> tuple[torch.Tensor, float]:
    """Worker 0 fetches the server's model; the others contribute nothing (weight 0)."""
    if ctx.index != 0:
        return ctx.flat.get(), 0.0
    x, state.figures = state.client.snapshot()
    return x, 1.0
