"""Which ranks of a run serve and which train: the one place the split is written.

A parameter-server algorithm needs `algorithm.servers(workers)` server ranks next to its training
workers; the servers take the first ranks of the world and worker i is rank `servers + i`
(docs/architecture.md). Every entry point (the runtime, the optimizer, the simulator helper
`distsgd.simulate_ranks`, the projection, the benchmarks) asks `Roles` rather than redoing the
arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from distsgd import algorithms
from distsgd.algorithms.base import Algorithm
from distsgd.errors import UsageError, check_range


@dataclass(frozen=True)
class Roles:
    """The server ranks and the worker ranks of one world, servers first."""

    servers: tuple[int, ...]
    workers: tuple[int, ...]

    @classmethod
    def of(cls, algorithm: Algorithm | str, workers: int) -> Roles:
        """The roles of a run of `workers` training workers plus the algorithm's servers."""
        check_range("workers", workers, 1)
        algorithm = algorithms.create(algorithm) if isinstance(algorithm, str) else algorithm
        servers = algorithm.servers(workers)
        return cls(tuple(range(servers)), tuple(range(servers, servers + workers)))

    @classmethod
    def of_world(cls, algorithm: Algorithm | str, world_size: int) -> Roles:
        """The roles of a world of `world_size` ranks (what a communicator knows): the largest
        worker count whose servers fill the rest of the world."""
        algorithm = algorithms.create(algorithm) if isinstance(algorithm, str) else algorithm
        for workers in range(world_size, 0, -1):
            if workers + algorithm.servers(workers) == world_size:
                return cls.of(algorithm, workers)
        raise UsageError(f"{algorithm.name} cannot split a world of {world_size} ranks into "
                         "servers and workers; valid world sizes: workers + "
                         f"{algorithm.name}'s servers for that many workers")

    @property
    def world_size(self) -> int:
        return len(self.servers) + len(self.workers)

    def is_server(self, rank: int) -> bool:
        return rank in self.servers

    def index(self, rank: int) -> int:
        """Worker `rank`'s position among the training workers (0..workers-1)."""
        if rank not in self.workers:
            raise ValueError(f"rank {rank} is not a training worker; valid ranks: "
                             f"{self.workers[0]}..{self.workers[-1]}")
        return rank - self.workers[0]
