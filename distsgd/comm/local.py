"""A world of one: lets `DistributedOptimizer` run unchanged without any distributed setup."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from distsgd.comm.base import (
    ByteCounter,
    Counted,
    Group,
    InOrder,
    InOrderExchange,
    InProcess,
)


class LocalComm(Counted, InProcess):
    """The `Comm` of a single worker: collectives are identities, point-to-point is an error."""

    def __init__(self) -> None:
        self._counter = ByteCounter()
        self._exposed: dict[str, Callable[[], Any]] = {}
        self._in_order = InOrder(self)

    rank = 0
    world_size = 1

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        raise ValueError(f"dst={dst}: a world of one worker has no peer to send to")

    def recv(self, out: torch.Tensor, src: int | None = None, timeout: float | None = None) -> int:
        raise ValueError("a world of one worker has no peer to receive from")

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]],
                 recvs: Sequence[tuple[torch.Tensor, int]],
                 timeout: float | None = None) -> tuple[frozenset[int], frozenset[int]]:
        return self._in_order.start(sends, recvs).wait()  # only an empty one has no peer

    def exchange_start(self, sends: Sequence[tuple[torch.Tensor, int]],
                       recvs: Sequence[tuple[torch.Tensor, int]]) -> InOrderExchange:
        return self._in_order.start(sends, recvs)  # only an empty exchange has no peer

    def poll(self, out: torch.Tensor, src: int | None = None) -> int | None:
        return None

    def expose(self, key: str, fn: Callable[[], Any]) -> None:
        self._exposed[key] = fn

    def observe(self, rank: int, key: str) -> Any:
        fn = self._exposed.get(key) if rank == 0 else None
        return None if fn is None else fn()

    def all_reduce_(self, tensor: torch.Tensor, group: Group | None = None,
                    timeout: float | None = None) -> torch.Tensor:
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int, group: Group | None = None,
                   timeout: float | None = None) -> torch.Tensor:
        return tensor

    def barrier(self, group: Group | None = None, timeout: float | None = None) -> None:
        return None

    def new_group(self, ranks: list[int] | tuple[int, ...]) -> Group:
        return Group(tuple(ranks))

    def elapse(self, seconds: float) -> None:
        return None

    def now(self) -> float | None:
        return None

