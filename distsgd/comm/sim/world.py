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
With `NetworkModel.rendezvous`, a message between machines moves as gloo's point-to-point does
under TorchComm: its payload leaves only once its header has crossed, the receiver has taken the
messages before it (one at a time) and a "ready" has crossed back, each small control message
waiting behind the queue of its machine's NIC (benchmarks/p2p_costs.py measures all three).
"""

from __future__ import annotations

import _thread
import contextlib
import math
import sys
import threading
from collections.abc import Callable, Collection, Mapping
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

    # Machines (docs/multi-machine.md): `hosts[r]` is rank r's machine (ranks past the end each
    # have their own). With `host_link`, a message between two machines also crosses both
    # machines' NICs, each shared by all the ranks of its machine, as on torchrun nodes: the
    # per-rank link (latency, bandwidth, `links`) is then the path inside a machine.
    hosts: tuple[int, ...] = ()
    host_link: Link | None = None
    # Point-to-point as a rendezvous (gloo, hence TorchComm; measured in benchmarks/p2p_costs.py):
    # a message's payload leaves only after its header has reached the receiver, the receiver's
    # one mailbox thread has finished the payload before it and posted the receive, and that
    # "ready" has come back. Between machines each of those control messages queues behind the
    # backlog of its machine's NIC, at most `host_queue` seconds of it (the shaper's queue: tbf
    # `latency 50ms` in distsgd.netns; beyond it TCP holds data back in the sender's socket).
    # Off by default: only messages between machines (`host_link`) are affected.
    rendezvous: bool = False
    host_queue: float = 0.05

    def link(self, src: int, dst: int) -> Link:
        return self.links.get((src, dst)) or Link(self.latency, self.bandwidth)

    def host(self, rank: int) -> int:
        return self.hosts[rank] if rank < len(self.hosts) else -1 - rank

    def crosses(self, src: int, dst: int) -> bool:
        """Whether a message from `src` to `dst` leaves its machine (over `host_link`)."""
        return self.host_link is not None and self.host(src) != self.host(dst)

    def allreduce_time(self, size: int, n: int, ranks: tuple[int, ...] = ()) -> float:
        # Ring all-reduce (gloo's): 2(n-1) rounds, each moving size/n bytes over every hop of the
        # ring at once, so a round lasts as long as the slowest hop.
        if n <= 1:
            return 0.0
        latency, bandwidth = self._slowest_hop(ranks)
        return self.overhead + 2 * (n - 1) * (latency + size / n / bandwidth)

    def broadcast_time(self, size: int, n: int, ranks: tuple[int, ...] = ()) -> float:
        if n <= 1:
            return 0.0
        latency, bandwidth = self._slowest_hop(ranks)
        return self.overhead + math.ceil(math.log2(n)) * (latency + size / bandwidth)

    def _slowest_hop(self, ranks: tuple[int, ...]) -> tuple[float, float]:
        """(latency, bandwidth) of the slowest hop of a ring over `ranks`, in order: a machine's
        NIC is shared by the ring's hops that leave it."""
        hops = list(zip(ranks, ranks[1:] + ranks[:1], strict=True))
        leaving: dict[int, int] = {}
        for a, b in hops:
            if self.crosses(a, b):
                leaving[self.host(a)] = leaving.get(self.host(a), 0) + 1
        if not leaving or self.host_link is None:
            return self.latency, self.bandwidth
        shared = self.host_link.bandwidth / max(leaving.values())
        return self.latency + self.host_link.latency, min(self.bandwidth, shared)


class _HostNics:
    """When each machine's NIC is free to send, and to receive, the next inter-machine message."""

    def __init__(self, network: NetworkModel) -> None:
        self.network = network
        self.egress: dict[int, float] = {}
        self.ingress: dict[int, float] = {}

    def ready(self, src: int, dst: int, start: float, mailbox_free: float) -> float:
        """When the payload of a message whose header the sending rank hands over at `start` may
        leave (`NetworkModel.rendezvous`): the header crosses, the receiving rank's mailbox is
        free at `mailbox_free`, its "ready" crosses back, each behind its NIC's queue."""
        link, queue = self.network.host_link, self.network.host_queue
        assert link is not None
        out, into = self.network.host(src), self.network.host(dst)
        header = max(start, min(self.egress.get(out, 0.0), start + queue)) + link.latency
        posted = max(header, mailbox_free)
        return max(posted, min(self.egress.get(into, 0.0), posted + queue)) + link.latency

    def cross(self, src: int, dst: int, size: int, start: float) -> tuple[float, float]:
        """(when the sender's machine has sent it, when the receiver's machine has it) for a
        message of `size` bytes that the sending rank hands over at `start`."""
        link = self.network.host_link
        assert link is not None
        out, into = self.network.host(src), self.network.host(dst)
        sent = max(start, self.egress.get(out, 0.0)) + size / link.bandwidth
        self.egress[out] = sent
        received = max(sent + link.latency, self.ingress.get(into, 0.0) + size / link.bandwidth)
        self.ingress[into] = received
        return sent, received


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
        self._host_nics = _HostNics(self.network)
        self._pending: dict[tuple[tuple[int, ...], int], _Collective] = {}
        self._coll_count: dict[tuple[int, tuple[int, ...]], int] = {}
        self._hold: tuple[Callable[[], None], frozenset[int]] | None = None  # see `hold`
        self._hold_ran = False
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
        if w.state != "failed":
            try:
                successor = self._successor()
            except BaseException as e:  # a hold's action failed in this finishing thread
                w.error, w.state, successor = e, "failed", None
        self._wake(None if w.state == "failed" else successor)

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

    def _successor(self) -> _Worker | None:
        """`_next`, but when nobody can act and workers are held, run the hold's action first
        and let the held workers go on (see `hold`)."""
        nxt = self._next()
        if nxt is None and self._hold is not None:
            (action, quorum), self._hold = self._hold, None
            # Every rank of the quorum parked: quiescent. Otherwise one of them is blocked
            # waiting for a held one (SSP's bound): let them all go on, the caller retries.
            self._hold_ran = all(self._workers[r].state == "held" for r in quorum)
            if self._hold_ran:
                action()
            for o in self._workers:
                if o.state == "held":
                    o.state = "ready"
                    self._rekey(o)
            nxt = self._next()
        return nxt

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
            if w.state in ("ready", "recv", "collective", "held"):
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
        self._wake(self._successor())
        w.go.acquire()
        if self._aborting:
            raise _Aborted()

    def _is_next(self, w: _Worker) -> bool:
        """True when no other worker could act before `w` (whose key must be current)."""
        return min(self._keys)[1] == w.rank

    def hold(self, rank: int, action: Callable[[], None], quorum: Collection[int]) -> bool:
        """Park `rank` outside virtual time until no worker of the world can act any more (every
        other one is held, done, or waiting for a message that nobody will send). Then, if every
        rank of `quorum` is held, `action` runs once, in whichever thread finds the world quiet;
        either way every held worker goes on. Returns whether `action` ran.

        A quiescent point for checkpoints: nothing moves while `action` reads or restores the
        state of every rank. Holding takes no virtual time; it can change the order in which
        workers act only where another worker would have acted at a later virtual time first.
        """
        w = self._workers[rank]
        w.state, self._keys[rank], self._hold = "held", _IDLE, (action, frozenset(quorum))
        while w.state == "held":
            self._yield(w)
        return self._hold_ran

    def state_dict(self) -> dict[str, Any]:
        """Clocks, NICs, byte counters and messages in flight of every rank (at a hold)."""
        if self._pending:
            raise RuntimeError("a collective is under way: the world is not quiescent")
        nics = self._host_nics
        return {"seq": self._seq, "host_nics": (dict(nics.egress), dict(nics.ingress)),
                "ranks": [{
            "clock": w.clock, "nic_free": w.nic_free, "ingress_free": w.ingress_free,
            "bytes_by_verb": dict(w.counter.by_verb),
            "inbox": [(m.arrival, m.seq, m.src, m.payload.cpu().clone()) for m in w.inbox],
        } for w in self._workers]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (at a hold of a world that has run up to there)."""
        self._seq = saved["seq"]
        egress, ingress = saved["host_nics"]
        self._host_nics.egress, self._host_nics.ingress = dict(egress), dict(ingress)
        for w, s in zip(self._workers, saved["ranks"], strict=True):
            w.clock, w.nic_free, w.ingress_free = s["clock"], s["nic_free"], s["ingress_free"]
            w.counter.by_verb = dict(s["bytes_by_verb"])
            w.inbox = [_Message(a, seq, src, p.clone()) for a, seq, src, p in s["inbox"]]
            self._rekey(w)

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
        if self.network.crosses(src, dst):  # then through both machines' shared NICs
            if self.network.rendezvous:
                start = self._host_nics.ready(src, dst, start, receiver.ingress_free)
            sent, arrival = self._host_nics.cross(src, dst, size, start)
            sender.nic_free = sent
            arrival = max(arrival, receiver.ingress_free + size / link.bandwidth)
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
            cost = self.network.allreduce_time(size, n, c.group)
            for r in c.group:
                self._workers[r].counter.add("all_reduce", ring_allreduce_bytes(size, n))
        elif c.verb == "broadcast":
            assert c.src is not None
            root = c.arrived[c.src]
            for t in tensors:
                if t is not root:
                    t.copy_(root)
            cost = self.network.broadcast_time(size, n, c.group)
            pos = {r: (i - c.group.index(c.src)) % n for i, r in enumerate(c.group)}
            for r in c.group:
                self._workers[r].counter.add("broadcast", size * tree_broadcast_children(pos[r], n))
        else:  # barrier
            cost = self.network.allreduce_time(0, n, c.group)
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
