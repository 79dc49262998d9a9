"""The parameter-server core behind downpour, easgd-async, eamsgd, ssp and async-sparse.

- `wire`: message kinds, the header and its checks, the replies (the protocol on the wire);
- `server`: `Shard` and the server loop (`ParameterServer`, the algorithms' server role);
- `client`: `PSClient`, a worker's side, and `ClientState`;
- `staleness`: the servers' staleness figures.

`ParameterServerAlgorithm` composes the two sides: its workers' hooks connect, push and pull
through a `PSClient`, its server ranks run `ParameterServer.serve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distsgd.algorithms.base import Algorithm, WorkerContext, hyperparameter
from distsgd.algorithms.ps.client import (
    ClientState,
    PSClient,
    connect,
    evaluated_from_server,
    start_client,
)
from distsgd.algorithms.ps.server import ParameterServer, R, Shard
from distsgd.algorithms.ps.staleness import HIST_BINS, STATS, merge_figures, stats_dict
from distsgd.algorithms.ps.wire import (
    DONE,
    ELASTIC,
    HEADER,
    PULL,
    PUSH,
    PUSH_SPARSE,
    SERVICE,
    SERVICES,
    check_header,
    shard_bounds,
)


@dataclass(frozen=True)
class ParameterServerAlgorithm(ParameterServer[R], Algorithm):
    """Base of the server-based algorithms: the worker's hooks shared by all, the server role
    from `ParameterServer`. `R` is the type of the server rule's state (`Shard.rule`)."""

    synchronous = False
    shards: int = hyperparameter(1, "server ranks the parameters are sharded over", low=1)

    def init(self, ctx: WorkerContext) -> ClientState:
        return start_client(ctx, self.bounded)

    def finish(self, ctx: WorkerContext, state: ClientState) -> None:
        state.client.done()

    def evaluated(self, ctx: WorkerContext, state: ClientState) -> tuple[torch.Tensor, float]:
        return evaluated_from_server(ctx, state)

    def metrics(self, ctx: WorkerContext, state: ClientState) -> dict[str, Any]:
        return state.figures

    def server_state_dicts(self, ctx: WorkerContext, state: ClientState) -> list[Any]:
        return state.client.server_states()


__all__ = ["DONE", "ELASTIC", "HEADER", "HIST_BINS", "PULL", "PUSH", "PUSH_SPARSE", "SERVICE",
           "SERVICES", "STATS", "ClientState", "PSClient", "ParameterServer",
           "ParameterServerAlgorithm", "Shard", "check_header", "connect", "evaluated_from_server",
           "merge_figures", "shard_bounds", "start_client", "stats_dict"]
