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
- ``exchange(sends, recvs, timeout=None)``: point-to-point where each rank knows in advance whom
  it receives from and what (sgp, crossover: from the shared seed). It posts every receive
  ``(out, src)`` and every send ``(tensor, dst)`` at once and returns when every ``out`` is
  filled and every send has left (as MPI_Sendrecv: a send may wait for its receiver's matching
  receive), so the caller may change the tensors at once. Its messages travel on a channel of
  their own: received only by the peer's ``exchange``, never by ``recv``/``poll``, and the k-th a
  rank sends a peer fills that peer's k-th ``exchange`` receive from it, of the same dtype and
  shape. Bytes count as ``send``. It returns ``(unsent, unfilled)``: the peers found dead under
  ``--on-failure continue`` to which nothing was sent, and those whose ``out`` was left as it
  was; both empty elsewhere. The simulator runs it as the sends, then the receives, in order:
  exactly the cost and result of ``send`` and ``recv``.
- ``exchange_start(sends, recvs)``: ``exchange`` that does not wait (OSGP: step t's shares are
  mixed in up to ``synch_freq`` steps later). It sends and posts at once and returns an
  `Exchange`: ``unsent`` at once, ``done()`` (never blocks: whether ``wait`` would return at once),
  ``wait(timeout=None)`` → ``(unsent, unfilled)`` as ``exchange`` returns, with every ``out``
  filled; read an ``out`` only after ``wait``. Same channel, numbering and byte counts as
  ``exchange``: the k-th message a rank sends a peer by either verb fills that peer's k-th receive
  from it by either, whatever order the handles are waited in. The simulator sends at once and
  receives at ``wait`` (a ``recv``) or at ``done`` once the message has arrived by the worker's
  clock (a ``poll``), in the order the receives were posted per sender.
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

What measurement and the runtime need of a run, through the same seam (never a backend's type):

- ``send_report(tensor, dst)`` / ``recv_report(out, src, timeout=None)``: the reports channel,
  uncounted and never mixed with the algorithm's messages, for measurement where ``observe``
  cannot read another rank (real processes). Ranks that share memory (the simulator, a world of
  one) have no such channel: ``observe`` reads in place, and the verbs raise `UsageError`.
- ``note_step(step)``: this rank completed training step ``step``. Whoever supervises the rank
  (the local launcher) records it, to name a dead worker's last step; a no-op elsewhere.
- ``deaths()``: ``{rank: (last step it noted or None, time.time() it was declared dead)}`` for
  the ranks that died in a run that carries on without them (``--on-failure continue``); empty
  where nothing died, or nothing can (the simulator, a world of one, torchrun).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from distsgd.errors import PeerDied, UsageError


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


class Exchange(Protocol):
    """An exchange under way (`Comm.exchange_start`)."""

    @property
    def unsent(self) -> frozenset[int]:
        """The destinations found dead (``--on-failure continue``) to which nothing was sent."""
        ...

    def done(self) -> bool:
        """Whether `wait` would return at once (every receive completed or failed); never
        blocks."""
        ...

    def wait(self, timeout: float | None = None) -> tuple[frozenset[int], frozenset[int]]:
        """Wait up to `timeout` seconds (None: the communicator's default) for every receive;
        ``(unsent, unfilled)`` as `Comm.exchange` returns. Once returned, it returns at once."""
        ...


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

    def exchange(
        self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]],
        timeout: float | None = None,
    ) -> tuple[frozenset[int], frozenset[int]]: ...

    def exchange_start(
        self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]],
    ) -> Exchange: ...

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

    def send_report(self, tensor: torch.Tensor, dst: int) -> None: ...

    def recv_report(self, out: torch.Tensor, src: int, timeout: float | None = None) -> int: ...

    def note_step(self, step: int) -> None: ...

    def deaths(self) -> dict[int, tuple[int | None, float]]: ...


class InProcess:
    """The measurement verbs of a backend whose ranks share this process (the simulator, a world
    of one): nothing supervises a rank or outlives another, and `observe` reads any rank's state
    in place, so there is no reports channel."""

    def send_report(self, tensor: torch.Tensor, dst: int) -> None:
        raise UsageError("send_report: this backend's ranks share memory and have no reports "
                         "channel; read other ranks' state with observe(rank, key)")

    def recv_report(self, out: torch.Tensor, src: int, timeout: float | None = None) -> int:
        raise UsageError("recv_report: this backend's ranks share memory and have no reports "
                         "channel; read other ranks' state with observe(rank, key)")

    def note_step(self, step: int) -> None:
        return None

    def deaths(self) -> dict[int, tuple[int | None, float]]:
        return {}


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


def check_exchange(sends: Sequence[tuple[torch.Tensor, int]],
                   recvs: Sequence[tuple[torch.Tensor, int]], rank: int, world_size: int) -> None:
    """ValueError unless every send names a `dst` and every receive a `src` that is another rank
    (checked before anything is sent, so that a bad call sends nothing)."""
    for what, pairs in (("dst", sends), ("src", recvs)):
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2
                    and isinstance(pair[0], torch.Tensor)):
                raise ValueError(f"exchange: {pair!r} is not a (tensor, {what}) pair")
            peer = pair[1]
            if isinstance(peer, bool) or not isinstance(peer, int) or not (
                    0 <= peer < world_size) or peer == rank:
                raise ValueError(f"exchange: {what}={peer!r} is not another rank of a world of "
                                 f"{world_size}")


@dataclass
class _Slot:
    """One receive of an `InOrder` exchange."""

    out: torch.Tensor
    filled: bool = False
    dead: bool = False  # its sender died (``--on-failure continue``): ``out`` is left as it was


class InOrder:
    """`exchange_start` where receives are not posted ahead (the simulator, a world of one): the
    sends go out at once; each receive is a ``recv`` at `wait`, or a ``poll`` at ``done``, taken
    in the order the receives were posted per sender (per-pair FIFO, as posted receives match).
    One per communicator."""

    def __init__(self, comm: Comm) -> None:
        self._comm = comm
        self._queues: dict[int, collections.deque[_Slot]] = {}

    def start(self, sends: Sequence[tuple[torch.Tensor, int]],
              recvs: Sequence[tuple[torch.Tensor, int]]) -> InOrderExchange:
        check_exchange(sends, recvs, self._comm.rank, self._comm.world_size)
        unsent = set()
        for tensor, dst in sends:
            try:
                self._comm.send(tensor, dst)
            except PeerDied:
                unsent.add(dst)
        slots = [(src, _Slot(out)) for out, src in recvs]
        for src, slot in slots:
            self._queues.setdefault(src, collections.deque()).append(slot)
        return InOrderExchange(self, frozenset(unsent), slots)

    def fill(self, src: int, slot: _Slot, block: bool) -> bool:
        """Take `src`'s messages into its posted slots up to `slot`; False if one has not arrived
        (never, if `block`)."""
        queue = self._queues[src]
        while not slot.filled:
            head = queue[0]
            try:
                if block:
                    self._comm.recv(head.out, src)
                elif self._comm.poll(head.out, src) is None:
                    return False
            except PeerDied:
                head.dead = True
            head.filled = True
            queue.popleft()
        return True


class InOrderExchange:
    """`InOrder`'s `Exchange`."""

    def __init__(self, owner: InOrder, unsent: frozenset[int],
                 slots: list[tuple[int, _Slot]]) -> None:
        self._owner, self._unsent, self._slots = owner, unsent, slots

    @property
    def unsent(self) -> frozenset[int]:
        return self._unsent

    def done(self) -> bool:
        return all(self._owner.fill(src, slot, block=False) for src, slot in self._slots)

    def wait(self, timeout: float | None = None) -> tuple[frozenset[int], frozenset[int]]:
        for src, slot in self._slots:
            self._owner.fill(src, slot, block=True)
        return self._unsent, frozenset(src for src, slot in self._slots if slot.dead)


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


# A context variable, not a thread-local: each thread starts with its own (empty) context, and so
# does each of the simulator's workers, which are greenlets sharing one thread.
_current: contextvars.ContextVar[Comm | None] = contextvars.ContextVar("distsgd_comm", default=None)


def set_current(comm: Comm | None) -> None:
    """Make `comm` this worker's communicator (the runtime does this for each worker)."""
    _current.set(comm)


def current() -> Comm | None:
    """This worker's communicator, set by the runtime; ``None`` outside a run."""
    return _current.get()
