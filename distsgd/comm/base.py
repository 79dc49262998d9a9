"""The one seam for communication: the verbs an algorithm may use on every backend.

Semantics both backends honour (tests/test_comm_conformance.py checks them on both):

- ``send(tensor, dst)`` is buffered and returns at once; the payload is copied, so the caller may
  modify ``tensor`` right after.
- ``recv(out, src=None)`` fills ``out`` (same shape and dtype as what was sent) and returns the
  sender; ``src=None`` takes a message from any sender. Per-pair FIFO order is the only ordering
  guarantee.
- ``all_reduce_`` (sum), ``broadcast_`` and ``barrier`` are collective over a group; every member
  calls them in the same order. ``new_group(ranks)`` is itself collective on real processes: every
  rank calls it with the same ranks, in the same order, members or not (torch.distributed requires
  it), so algorithms create their groups in ``init`` on every rank.
- ``poll(out, src=None)`` is ``recv`` that never blocks: it takes a message that has already
  arrived, or returns ``None`` (gossip merges its inbox this way; the sender never waits).
- ``expose(key, fn)`` / ``observe(rank, key)`` let measurement code read another rank's state for
  free where ranks share memory (the simulator: no message, no virtual time, so evaluating never
  changes a run); ``observe`` returns ``None`` where they do not, and the caller then asks by
  message, outside the byte counts.
- ``elapse(seconds)`` charges modelled compute time; a no-op on real hardware.
- every blocking verb takes a timeout (``None``: the communicator's default). A real backend raises
  `CommTimeout`; the simulator raises `DeadlockError` when every live worker is blocked.
- every verb counts the bytes this rank sends, per verb (``bytes_by_verb``), except inside
  ``uncounted()``, which measurement code (consensus distance, evaluation) uses so that metrics do
  not distort the traffic they report.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Group:
    """A set of global ranks that run collectives together; ``handle`` is the backend's object."""

    ranks: tuple[int, ...]
    handle: Any = field(default=None, compare=False, repr=False)

    def __contains__(self, rank: object) -> bool:
        return rank in self.ranks

    @property
    def size(self) -> int:
        return len(self.ranks)


@runtime_checkable
class Comm(Protocol):
    """A worker's view of the network (see the module docstring for the semantics)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def send(self, tensor: torch.Tensor, dst: int) -> None: ...

    def recv(
        self, out: torch.Tensor, src: int | None = None, timeout: float | None = None,
    ) -> int: ...

    def poll(self, out: torch.Tensor, src: int | None = None) -> int | None: ...

    def expose(self, key: str, fn: Callable[[], Any]) -> None: ...

    def observe(self, rank: int, key: str) -> Any: ...

    def all_reduce_(
        self, tensor: torch.Tensor, group: Group | None = None, timeout: float | None = None
    ) -> torch.Tensor: ...

    def broadcast_(
        self, tensor: torch.Tensor, src: int, group: Group | None = None,
        timeout: float | None = None,
    ) -> torch.Tensor: ...

    def barrier(self, group: Group | None = None, timeout: float | None = None) -> None: ...

    def new_group(self, ranks: list[int] | tuple[int, ...]) -> Group: ...

    def elapse(self, seconds: float) -> None: ...

    def now(self) -> float | None:
        """Virtual time in seconds in the simulator; ``None`` on real hardware."""
        ...

    @property
    def bytes_sent(self) -> int: ...

    @property
    def bytes_by_verb(self) -> dict[str, int]: ...

    def uncounted(self) -> contextlib.AbstractContextManager[None]: ...

    def restore_counts(self, by_verb: dict[str, int]) -> None: ...


class ByteCounter:
    """Bytes sent by one rank, per verb; shared by both backends so they count alike."""

    def __init__(self) -> None:
        self.by_verb: dict[str, int] = {}
        self._paused = 0

    def add(self, verb: str, nbytes: float) -> None:
        if not self._paused:
            self.by_verb[verb] = self.by_verb.get(verb, 0) + round(nbytes)

    @property
    def total(self) -> int:
        return sum(self.by_verb.values())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


class Counted:
    """The byte-counting half of `Comm`, shared by every backend: needs ``self._counter``."""

    _counter: ByteCounter

    @property
    def bytes_sent(self) -> int:
        return self._counter.total

    @property
    def bytes_by_verb(self) -> dict[str, int]:
        return dict(self._counter.by_verb)

    def uncounted(self) -> contextlib.AbstractContextManager[None]:
        return self._counter.paused()

    def restore_counts(self, by_verb: dict[str, int]) -> None:
        """Continue counting from a checkpoint's figures (a resumed run)."""
        self._counter.by_verb = dict(by_verb)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# Collective byte conventions, identical on both backends because gloo's internal traffic cannot
# be observed: all-reduce counts what a ring all-reduce sends (2(n-1)/n of the tensor per rank),
# broadcast what a binomial tree sends (the payload once per child of this rank).
def ring_allreduce_bytes(size: int, n: int) -> float:
    return 0.0 if n <= 1 else 2.0 * (n - 1) / n * size


def tree_broadcast_children(position: int, n: int) -> int:
    """Children of the node at `position` (0 = root) in a binomial broadcast tree of n nodes."""
    children, step = 0, 1
    while step < n:
        if position < step and position + step < n:
            children += 1
        step *= 2
    return children


_current = threading.local()


def set_current(comm: Comm | None) -> None:
    """Make `comm` this thread's communicator (the runtime does this for each worker)."""
    _current.comm = comm


def current() -> Comm | None:
    """This thread's communicator, set by the runtime; ``None`` outside a run."""
    return getattr(_current, "comm", None)
