"""SimComm: one simulated worker's `Comm`. Each verb checks its arguments and hands the work to
the worker's `SimWorld`; blocking verbs block in virtual time only, never in real time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from distsgd.comm.base import Counted, Group, InOrder, InOrderExchange, InProcess

if TYPE_CHECKING:  # the world makes its comms: no import at run time, no cycle
    from distsgd.comm.sim.world import SimWorld


class SimComm(Counted, InProcess):
    """One simulated worker's `Comm`; blocking verbs never block in real time.

    No simulated rank dies (`deaths` is empty), so no verb here raises `PeerDied`; where a rank
    has died (`TorchComm` under ``--on-failure continue``), a send to it and a recv or a poll
    from it raise it, which is what algorithms written for both backends handle.
    """

    def __init__(self, world: SimWorld, rank: int) -> None:
        self._world = world
        self._rank = rank
        self._everyone = Group(tuple(range(world.world_size)))
        self._counter = world._workers[rank].counter
        self._in_order = InOrder(self)  # exchange_start's receives, per sender in order

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world.world_size

    @property
    def nodes(self) -> tuple[int, ...]:
        """The machine of each rank (`NetworkModel.hosts`; otherwise each rank is a machine)."""
        return tuple(self._world.network.host(r) for r in range(self.world_size))

    def _check_peer(self, peer: int, what: str) -> None:
        if not 0 <= peer < self.world_size or peer == self._rank:
            raise ValueError(f"{what}={peer} is not another rank of a world of {self.world_size}")

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._check_peer(dst, "dst")
        self._world.deliver(self._rank, dst, tensor.detach().clone())

    def recv(self, out: torch.Tensor, src: int | None = None, timeout: float | None = None) -> int:
        if src is not None:
            self._check_peer(src, "src")
        return self._world.recv(self._rank, out, src)

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]],
                 recvs: Sequence[tuple[torch.Tensor, int]],
                 timeout: float | None = None) -> tuple[frozenset[int], frozenset[int]]:
        # in line behind exchange_start's receives: per pair, the k-th message fills the k-th
        return self._in_order.start(sends, recvs).wait()

    def exchange_start(self, sends: Sequence[tuple[torch.Tensor, int]],
                       recvs: Sequence[tuple[torch.Tensor, int]]) -> InOrderExchange:
        """Sends now; each receive at `wait` (a recv) or at `done` once it has arrived."""
        return self._in_order.start(sends, recvs)

    def poll(self, out: torch.Tensor, src: int | None = None) -> int | None:
        if src is not None:
            self._check_peer(src, "src")
        return self._world.poll(self._rank, out, src)

    def expose(self, key: str, fn: Callable[[], Any]) -> None:
        self._world._workers[self._rank].exposed[key] = fn

    def observe(self, rank: int, key: str) -> Any:
        fn = self._world._workers[rank].exposed.get(key)
        return None if fn is None else fn()

    def _group(self, group: Group | None) -> tuple[int, ...]:
        return (group or self._everyone).ranks

    def all_reduce_(self, tensor: torch.Tensor, group: Group | None = None,
                    timeout: float | None = None) -> torch.Tensor:
        self._world.collective(self._rank, "all_reduce", tensor, self._group(group))
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int, group: Group | None = None,
                   timeout: float | None = None) -> torch.Tensor:
        if src not in self._group(group):
            raise ValueError(f"broadcast src={src} is not a member of group "
                             f"{list(self._group(group))}")
        self._world.collective(self._rank, "broadcast", tensor, self._group(group), src=src)
        return tensor

    def barrier(self, group: Group | None = None, timeout: float | None = None) -> None:
        self._world.collective(self._rank, "barrier", torch.empty(0), self._group(group))

    def new_group(self, ranks: list[int] | tuple[int, ...]) -> Group:
        ranks = tuple(ranks)
        if len(set(ranks)) != len(ranks) or any(not 0 <= r < self.world_size for r in ranks):
            raise ValueError(f"new_group({list(ranks)}): ranks must be distinct members of "
                             f"0..{self.world_size - 1}")
        return Group(ranks)

    def elapse(self, seconds: float) -> None:
        self._world.elapse(self._rank, seconds)

    def now(self) -> float | None:
        return self._world._workers[self._rank].clock
