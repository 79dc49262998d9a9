"""SimWorld: N workers in one process, a virtual clock, and a model of the network.

Each simulated worker is a thread, but only one runs at a time: the one holding the baton. Whenever
a worker blocks or charges time, it picks the worker that can make progress at the smallest virtual
time (ties by rank) and hands the baton directly to it, or keeps running if that is itself. This is
a conservative discrete-event simulation: a message sent at virtual time t can never arrive before
t, and no worker runs while another could still act at an earlier time, so an any-source ``recv``
always gets the message that arrives first in virtual time, and a run replays bit for bit.

Scheduling. Each worker has a key: (clock, rank) when it is ready; (max(clock, arrival of the
message it would take), rank) when it waits in ``recv`` and such a message is on its way; and
`_IDLE`, after every other key, when it cannot act (a ``recv`` with nothing to take, a collective
that others have yet to join, done, failed). `SimWorld._keys` holds them, updated wherever a
state, a clock or a waiting receiver's inbox changes. The worker with the smallest key runs. It
goes on only while its key is still the smallest (after `elapse`, after completing a collective,
in `recv`), and nothing it does moves another worker to an earlier time: a message sent at t
arrives at t or later, a collective ends no earlier than its members' clocks. When it must stop,
it hands the baton straight to the worker with the smallest key; if no worker can act, it tells
the main thread instead, which only starts rank 0 in `SimWorld.run` and then waits for the end:
all done, a failure, or a deadlock (no worker can act while some are unfinished). The choice is
made from state that nobody else is changing, so it does not matter which thread makes it. Each
worker parks on its own raw lock (held from the start; one ``release`` wakes it), so a switch
costs one OS wake-up.

Network model (per link, defaults like 10 GbE): each worker has one full-duplex NIC that sends one
message at a time and receives one at a time. A message of b bytes sent at t leaves when the
sender's NIC is free and occupies it for b / bandwidth; it is fully received latency later, or, if
the receiver's NIC is still busy with earlier messages, b / bandwidth after that. So per-pair FIFO
order holds, a worker that pushes to many peers pays for its egress, and a parameter server that
many workers push to pays for its ingress. Collectives cost what a ring all-reduce (or a
binomial-tree broadcast) costs under the same model, and they synchronise the group's clocks.
"""

from __future__ import annotations

import _thread
import contextlib
import math
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from distsgd.comm.base import (
    ByteCounter,
    Counted,
    Group,
    nbytes,
    ring_allreduce_bytes,
    set_current,
    tree_broadcast_children,
)
from distsgd.errors import DeadlockError, WorkerFailure

T = TypeVar("T")


@dataclass(frozen=True)
class Link:
    latency: float = 25e-6  # seconds, one way
    bandwidth: float = 1.25e9  # bytes per second (10 Gbit/s)


@dataclass(frozen=True)
class NetworkModel:
    """Latency and bandwidth, with optional per-link overrides keyed by (src, dst)."""

    latency: float = 25e-6
    bandwidth: float = 1.25e9
    links: Mapping[tuple[int, int], Link] = field(default_factory=dict)
    # Fixed cost of handing one message or collective to the transport (framing, syscalls).
    overhead: float = 0.0

    def link(self, src: int, dst: int) -> Link:
        return self.links.get((src, dst)) or Link(self.latency, self.bandwidth)

    def allreduce_time(self, size: int, n: int) -> float:
        # Ring all-reduce: 2(n-1) rounds, each moving size/n bytes over one link.
        if n <= 1:
            return 0.0
        return self.overhead + 2 * (n - 1) * (self.latency + size / n / self.bandwidth)

    def broadcast_time(self, size: int, n: int) -> float:
        if n <= 1:
            return 0.0
        return self.overhead + math.ceil(math.log2(n)) * (self.latency + size / self.bandwidth)


# The key of a worker that cannot act: after every real key (clock, rank), even an infinite clock.
_IDLE: tuple[float, int] = (math.inf, sys.maxsize)


def _held_lock() -> _thread.LockType:
    """A raw lock that is held from the start: ``acquire`` parks, one ``release`` wakes."""
    lock = _thread.allocate_lock()
    lock.acquire()
    return lock


class _Aborted(BaseException):
    """Raised inside a worker thread to unwind it when the world stops (deadlock or failure)."""


@dataclass
class _Message:
    arrival: float
    seq: int
    src: int
    payload: torch.Tensor


@dataclass
class _Collective:
    verb: str
    group: tuple[int, ...]
    arrived: dict[int, torch.Tensor] = field(default_factory=dict)
    clocks: dict[int, float] = field(default_factory=dict)
    src: int | None = None


@dataclass
class _Worker:
    rank: int
    go: _thread.LockType = field(default_factory=_held_lock)  # released to give it the baton
    clock: float = 0.0
    state: str = "ready"  # ready | recv | collective | done | failed
    recv_src: int | None = None
    collective: _Collective | None = None
    inbox: list[_Message] = field(default_factory=list)
    nic_free: float = 0.0  # when this worker's NIC finishes sending what it was given
    ingress_free: float = 0.0  # when it finishes receiving what is on its way
    exposed: dict[str, Callable[[], Any]] = field(default_factory=dict)
    counter: ByteCounter = field(default_factory=ByteCounter)
    result: Any = None
    error: BaseException | None = None

    def candidate(self) -> _Message | None:
        """The first message (in virtual arrival order) that the pending recv would take."""
        best = None
        for m in self.inbox:
            if self.recv_src is not None and m.src != self.recv_src:
                continue
            if best is None or (m.arrival, m.seq) < (best.arrival, best.seq):
                best = m
        return best

    def describe(self) -> str:
        if self.state == "recv":
            who = "any sender" if self.recv_src is None else f"rank {self.recv_src}"
            return f"rank {self.rank}: blocked in recv from {who} at t={self.clock:.6g}s"
        if self.state == "collective" and self.collective is not None:
            c = self.collective
            return (f"rank {self.rank}: blocked in {c.verb} on group {list(c.group)} "
                    f"({len(c.arrived)}/{len(c.group)} arrived) at t={self.clock:.6g}s")
        return f"rank {self.rank}: {self.state} at t={self.clock:.6g}s"


class SimWorld:
    """N simulated workers; `run(fn)` calls ``fn(comm)`` on each and returns their results."""

    def __init__(self, world_size: int, network: NetworkModel | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be at least 1")
        self.world_size = world_size
        self.network = network or NetworkModel()
        self._workers = [_Worker(r) for r in range(world_size)]
        self._keys = [self._key(w) for w in self._workers]  # see the module docstring
        self._over = _held_lock()  # released once: the run is over (done, failed or deadlocked)
        self._aborting = False
        self._started = False
        self._seq = 0
        self._pending: dict[tuple[tuple[int, ...], int], _Collective] = {}
        self._coll_count: dict[tuple[int, tuple[int, ...]], int] = {}
        self.comms = [SimComm(self, r) for r in range(world_size)]

    # ----------------------------------------------------------------- driving the run
    def run(self, fn: Callable[[SimComm], T]) -> list[T]:
        if self._started:
            raise RuntimeError("a SimWorld runs once: make a new one for another run")
        self._started = True
        threads = [
            threading.Thread(target=self._body, args=(fn, w), name=f"sim-worker-{w.rank}",
                             daemon=True)
            for w in self._workers
        ]
        for t in threads:
            t.start()
        failure: BaseException | None = None
        try:
            self._wake(self._next())  # rank 0: every clock is still 0
            self._over.acquire()
            # At most one worker fails: the one that did stops the run.
            failure = next((w.error for w in self._workers if w.state == "failed"), None)
        finally:
            self._abort_all()
            for t in threads:
                t.join()
        if failure is not None:
            raise self._wrap(failure)
        blocked = [w for w in self._workers if w.state not in ("done", "failed")]
        if blocked:
            states = "; ".join(w.describe() for w in self._workers)
            raise DeadlockError(f"every live simulated worker is blocked: {states}")
        return [w.result for w in self._workers]

    def _wrap(self, error: BaseException) -> BaseException:
        rank = next(w.rank for w in self._workers if w.error is error)
        if isinstance(error, (WorkerFailure, DeadlockError)) or not isinstance(error, Exception):
            return error
        # Errors of the user's own making (bad hyperparameters found in init) keep their type so
        # the CLI reports them as such; anything else names the failing worker.
        from distsgd.errors import UsageError

        if isinstance(error, UsageError):
            return error
        wrapped = WorkerFailure(f"simulated worker {rank} failed at "
                                f"t={self._workers[rank].clock:.6g}s: {error!r}")
        wrapped.__cause__ = error
        return wrapped

    def _body(self, fn: Callable[[SimComm], Any], w: _Worker) -> None:
        w.go.acquire()
        if self._aborting:
            return
        set_current(self.comms[w.rank])
        try:
            w.result = fn(self.comms[w.rank])
            w.state = "done"
        except _Aborted:
            return
        except BaseException as e:  # reported to the caller of run()
            w.error = e
            w.state = "failed"
        finally:
            set_current(None)
        self._keys[w.rank] = _IDLE
        if self._aborting:  # the run is over already: nobody takes the baton any more
            return
        # A failure ends the run; otherwise the baton goes on (or the run ends if nobody can act).
        self._wake(None if w.state == "failed" else self._next())

    def _key(self, w: _Worker) -> tuple[float, int]:
        """When `w` could act next, as (virtual time, rank); `_IDLE` when it cannot act."""
        if w.state == "ready":
            return (w.clock, w.rank)
        if w.state == "recv":
            m = w.candidate()
            if m is not None:
                return (max(w.clock, m.arrival), w.rank)
        return _IDLE

    def _rekey(self, w: _Worker) -> None:
        self._keys[w.rank] = self._key(w)

    def _next(self) -> _Worker | None:
        """The worker with the smallest key; None when no worker can act."""
        key = min(self._keys)  # keys are distinct (one rank each): ties cannot arise
        return None if key is _IDLE else self._workers[key[1]]

    def _wake(self, w: _Worker | None) -> None:
        """Give the baton to `w`, or tell `run` that the run is over (`w` None)."""
        lock = self._over if w is None else w.go
        try:
            lock.release()
        except RuntimeError:  # released twice: possible only while the world is stopping
            if not self._aborting:
                raise

    def _abort_all(self) -> None:
        """Wake every unfinished worker with `_aborting` set, so that each unwinds."""
        self._aborting = True
        for w in self._workers:
            if w.state in ("ready", "recv", "collective"):
                # Each such worker's lock is held (it is parked, or has not started) unless
                # the main thread was interrupted while a hand-off was under way.
                with contextlib.suppress(RuntimeError):
                    w.go.release()

    # ------------------------------------------------------------ called from workers
    def _yield(self, w: _Worker) -> None:
        """Hand the baton to the next worker and park until `w` is the next one again.

        Callers yield only when another worker is next (or `w` cannot act); were `w` next itself,
        it would wake itself and return at once.
        """
        if self._aborting:  # a verb called while unwinding (a `finally` in user code)
            raise _Aborted()
        self._wake(self._next())
        w.go.acquire()
        if self._aborting:
            raise _Aborted()

    def _is_next(self, w: _Worker) -> bool:
        """True when no other worker could act before `w` (whose key must be current)."""
        return min(self._keys)[1] == w.rank

    def clocks(self) -> list[float]:
        return [w.clock for w in self._workers]

    def bytes_sent(self) -> list[int]:
        return [w.counter.total for w in self._workers]

    def deliver(self, src: int, dst: int, payload: torch.Tensor) -> None:
        sender = self._workers[src]
        link = self.network.link(src, dst)
        size = nbytes(payload)
        receiver = self._workers[dst]
        start = max(sender.clock + self.network.overhead, sender.nic_free)
        sender.nic_free = start + size / link.bandwidth
        arrival = max(sender.nic_free + link.latency, receiver.ingress_free + size / link.bandwidth)
        receiver.ingress_free = arrival
        self._seq += 1
        receiver.inbox.append(_Message(arrival, self._seq, src, payload))
        if receiver.state == "recv":  # waiting for a message: this one may move its key
            self._rekey(receiver)
        sender.counter.add("send", size)

    def recv(self, rank: int, out: torch.Tensor, src: int | None) -> int:
        w = self._workers[rank]
        w.state, w.recv_src = "recv", src
        self._rekey(w)  # (max(clock, arrival of the candidate), rank), or _IDLE without one
        while True:
            m = w.candidate()
            if m is not None and (w.clock >= m.arrival or self._is_next(w)):
                break
            self._yield(w)
        w.state, w.recv_src = "ready", None
        w.inbox.remove(m)
        w.clock = max(w.clock, m.arrival)
        self._keys[rank] = (w.clock, rank)
        _copy_into(out, m, rank)
        return m.src

    def poll(self, rank: int, out: torch.Tensor, src: int | None) -> int | None:
        """Take a message that has arrived by this worker's clock, without blocking.

        Sound without yielding: the running worker has the smallest clock of all, so every message
        that can arrive by now has already been sent.
        """
        w = self._workers[rank]
        w.recv_src = src
        m = w.candidate()
        w.recv_src = None
        if m is None or m.arrival > w.clock:
            return None
        w.inbox.remove(m)
        _copy_into(out, m, rank)
        return m.src

    def elapse(self, rank: int, seconds: float) -> None:
        if not 0 <= seconds < math.inf:  # NaN too: it would not compare when scheduling
            raise ValueError(f"elapse({seconds}): seconds must be finite and >= 0")
        w = self._workers[rank]
        w.clock += seconds
        self._keys[rank] = (w.clock, rank)
        if not self._is_next(w):
            self._yield(w)

    def collective(self, rank: int, verb: str, tensor: torch.Tensor, group: tuple[int, ...],
                   src: int | None = None) -> None:
        if rank not in group:
            raise ValueError(f"rank {rank} called {verb} on group {list(group)} it is not in")
        w = self._workers[rank]
        index = self._coll_count.get((rank, group), 0)
        self._coll_count[(rank, group)] = index + 1
        c = self._pending.setdefault((group, index), _Collective(verb, group, src=src))
        if c.verb != verb or c.src != src:
            raise ValueError(f"collective mismatch on group {list(group)}: rank {rank} called "
                             f"{verb} while others called {c.verb}")
        c.arrived[rank], c.clocks[rank] = tensor, w.clock
        if len(c.arrived) < len(group):
            w.state, w.collective = "collective", c
            self._keys[rank] = _IDLE
            while w.state == "collective":
                self._yield(w)
            return
        del self._pending[(group, index)]
        self._complete(c)
        if not self._is_next(w):
            self._yield(w)

    def _complete(self, c: _Collective) -> None:
        tensors = [c.arrived[r] for r in c.group]
        shapes = {(tuple(t.shape), t.dtype) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"{c.verb} on group {list(c.group)} got mismatched tensors {shapes}")
        size, n = nbytes(tensors[0]), len(c.group)
        if c.verb == "all_reduce":
            total = tensors[0].clone()
            for t in tensors[1:]:  # rank order: deterministic summation
                total.add_(t)
            for t in tensors:
                t.copy_(total)
            cost = self.network.allreduce_time(size, n)
            for r in c.group:
                self._workers[r].counter.add("all_reduce", ring_allreduce_bytes(size, n))
        elif c.verb == "broadcast":
            assert c.src is not None
            root = c.arrived[c.src]
            for t in tensors:
                if t is not root:
                    t.copy_(root)
            cost = self.network.broadcast_time(size, n)
            pos = {r: (i - c.group.index(c.src)) % n for i, r in enumerate(c.group)}
            for r in c.group:
                self._workers[r].counter.add("broadcast", size * tree_broadcast_children(pos[r], n))
        else:  # barrier
            cost = self.network.allreduce_time(0, n)
        end = max(c.clocks.values()) + cost
        for r in c.group:
            o = self._workers[r]
            o.clock = end
            if o.state == "collective":
                o.state, o.collective = "ready", None
            self._keys[r] = (end, r)


def _copy_into(out: torch.Tensor, m: _Message, rank: int) -> None:
    if m.payload.shape != out.shape or m.payload.dtype != out.dtype:
        raise ValueError(
            f"rank {rank} received a {m.payload.dtype} tensor of shape {tuple(m.payload.shape)} "
            f"from rank {m.src} into a {out.dtype} buffer of shape {tuple(out.shape)}; sender "
            "and receiver must agree on the message layout")
    out.copy_(m.payload)


class SimComm(Counted):
    """One simulated worker's `Comm`; blocking verbs never block in real time."""

    def __init__(self, world: SimWorld, rank: int) -> None:
        self._world = world
        self._rank = rank
        self._everyone = Group(tuple(range(world.world_size)))
        self._counter = world._workers[rank].counter

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world.world_size


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
