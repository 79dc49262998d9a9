"""SimWorld: N workers in one process, a virtual clock, and a model of the network.

The scheduler (`distsgd.comm.sim.scheduler`) runs the workers one at a time in virtual time
order; the network model (`distsgd.comm.sim.network`) says when a message arrives and what a
collective costs. This module joins them: what each verb does to the workers' clocks, inboxes and
byte counters, and the world's state for checkpoints. Collectives synchronise the group's clocks:
they end at the latest member's clock plus the collective's modelled cost.

Transfer CPU (`NetworkModel.cpu_per_byte`): every byte a rank sends or receives costs it CPU, a
message sent once it has left the rank's NIC (bytes still queued behind a slow link have cost
nothing yet), a message received once taken. That CPU is spent while the rank waits for the
network (a blocking receive, a collective), so a rank that waits anyway loses nothing; what is
left over (`_Worker.debt`) delays the rank's next computation (`elapse`). So communication that
overlaps computation (OSGP, asynchronous pushes) is not free on a machine whose cores are busy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from distsgd.comm.base import (
    nbytes,
    ring_allreduce_bytes,
    set_current,
    tree_broadcast_children,
)
from distsgd.comm.sim.network import NetworkModel, Nics, Port
from distsgd.comm.sim.scheduler import _IDLE, Scheduler, _Collective, _Message, _Worker
from distsgd.comm.sim.simcomm import SimComm

T = TypeVar("T")


class SimWorld(Scheduler):
    """N simulated workers; `run(fn)` calls ``fn(comm)`` on each and returns their results."""

    def __init__(self, world_size: int, network: NetworkModel | None = None) -> None:
        super().__init__(world_size)
        self.network = network or NetworkModel()
        self._nics = Nics(self.network, world_size)
        self._seq = 0
        self._pending: dict[tuple[tuple[int, ...], int], _Collective] = {}
        self._coll_count: dict[tuple[int, tuple[int, ...]], int] = {}
        self.comms = [SimComm(self, r) for r in range(world_size)]

    def run(self, fn: Callable[[SimComm], T]) -> list[T]:
        return self._run([functools.partial(_as_current, fn, comm) for comm in self.comms])

    # --------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Clocks, NICs, byte counters and messages in flight of every rank (at a hold)."""
        if self._pending:
            raise RuntimeError("a collective is under way: the world is not quiescent")
        hosts = self._nics.hosts
        return {"seq": self._seq,
                "host_nics": (dict(hosts.egress), {h: p.free for h, p in hosts.ingress.items()}),
                "host_ingress_busy": {h: list(p.busy) for h, p in hosts.ingress.items()},
                "ranks": [{
            "clock": w.clock, "nic_free": nic.egress_free, "ingress_free": nic.ingress_free,
            "ingress_busy": list(nic.ingress.busy),
            "bytes_by_verb": dict(w.counter.by_verb), "cpu_debt": (w.debt, list(w.sending)),
            "inbox": [(m.arrival, m.seq, m.src, m.payload.cpu().clone()) for m in w.inbox],
        } for w, nic in zip(self._workers, self._nics.ranks, strict=True)]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (at a hold of a world that has run up to there)."""
        self._seq = saved["seq"]
        egress, ingress = saved["host_nics"]
        busy = saved.get("host_ingress_busy", {})  # older checkpoints: busy until free
        self._nics.hosts.egress = dict(egress)
        self._nics.hosts.ingress = {h: _port(busy.get(h), free) for h, free in ingress.items()}
        for w, nic, s in zip(self._workers, self._nics.ranks, saved["ranks"], strict=True):
            w.clock, nic.egress_free = s["clock"], s["nic_free"]
            nic.ingress = _port(s.get("ingress_busy"), s["ingress_free"])
            w.counter.by_verb = dict(s["bytes_by_verb"])
            w.debt, sending = s.get("cpu_debt", (0.0, []))  # older checkpoints: none owed
            w.sending = [(float(t), float(c)) for t, c in sending]
            w.inbox = [_Message(a, seq, src, p.clone()) for a, seq, src, p in s["inbox"]]
            self._rekey(w)

    def clocks(self) -> list[float]:
        return [w.clock for w in self._workers]

    def bytes_sent(self) -> list[int]:
        return [w.counter.total for w in self._workers]

    # ------------------------------------------------------------ the verbs, per worker
    def deliver(self, src: int, dst: int, payload: torch.Tensor) -> None:
        sender, receiver = self._workers[src], self._workers[dst]
        size = nbytes(payload)
        arrival = self._nics.send(src, dst, size, sender.clock)
        self._seq += 1
        receiver.inbox.append(_Message(arrival, self._seq, src, payload))
        if receiver.state == "recv":  # waiting for a message: this one may move its key
            self._rekey(receiver)
        sender.counter.add("send", size)
        if self.network.cpu_per_byte:  # owed once the message has left the sender's NIC
            left = self._nics.ranks[src].egress_free
            sender.sending.append((left, size * self.network.cpu_per_byte))

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
        waited = max(0.0, m.arrival - w.clock)  # receiving's CPU is spent while it arrives
        w.clock = max(w.clock, m.arrival)
        self._keys[rank] = (w.clock, rank)
        _copy_into(out, m, rank)
        self._owe(w, nbytes(m.payload), waited, w.clock)
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
        self._owe(w, nbytes(m.payload), 0.0, w.clock)
        return m.src

    def _owe(self, w: _Worker, size: float, waited: float, until: float) -> None:
        """`w` received `size` bytes, and its messages that have left by `until` are sent, and it
        had waited `waited` seconds for the network meanwhile: the transfer CPU that the wait did
        not absorb is still owed (paid at the next `elapse`)."""
        if self.network.cpu_per_byte:
            w.debt = max(0.0, w.debt + self._sent_by(w, until)
                         + size * self.network.cpu_per_byte - waited)

    @staticmethod
    def _sent_by(w: _Worker, until: float) -> float:
        """The CPU of `w`'s messages that have left its NIC by `until`, taken off `w.sending`."""
        cost = sum(c for t, c in w.sending if t <= until)
        if cost:
            w.sending = [(t, c) for t, c in w.sending if t > until]
        return cost

    def elapse(self, rank: int, seconds: float) -> None:
        if not 0 <= seconds < math.inf:  # NaN too: it would not compare when scheduling
            raise ValueError(f"elapse({seconds}): seconds must be finite and >= 0")
        w = self._workers[rank]
        if w.sending:  # messages that leave while it computes compete with it too
            w.debt += self._sent_by(w, w.clock + seconds)
        w.clock += seconds + w.debt  # computing waits for the transfer CPU still owed
        w.debt = 0.0
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
        """The last member has arrived: combine the tensors, charge the cost, release the group."""
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
            moved = {r: 2 * ring_allreduce_bytes(size, n) for r in c.group}  # sent and received
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
            moved = {r: size * (tree_broadcast_children(pos[r], n) + (r != c.src))
                     for r in c.group}
            for r in c.group:
                self._workers[r].counter.add("broadcast", size * tree_broadcast_children(pos[r], n))
        else:  # barrier
            cost = self.network.allreduce_time(0, n, c.group)
            moved = {r: 0 for r in c.group}
        end = max(c.clocks.values()) + cost
        for r in c.group:
            o = self._workers[r]
            self._owe(o, moved[r], end - c.clocks[r], end)
            o.clock = end
            if o.state == "collective":
                o.state, o.collective = "ready", None
            self._keys[r] = (end, r)


def _as_current(fn: Callable[[SimComm], T], comm: SimComm) -> T:
    """``fn(comm)`` with `comm` as the worker's current communicator (`distsgd.comm.current`)."""
    set_current(comm)
    try:
        return fn(comm)
    finally:
        set_current(None)


def _port(busy: list[tuple[float, float]] | None, free: float) -> Port:
    """A saved receiving port; without its busy stretches (older checkpoints), busy until `free`."""
    if busy is None:
        return Port([(0.0, free)] if free > 0 else [])
    return Port([(float(a), float(b)) for a, b in busy])


def _copy_into(out: torch.Tensor, m: _Message, rank: int) -> None:
    if m.payload.shape != out.shape or m.payload.dtype != out.dtype:
        raise ValueError(
            f"rank {rank} received a {m.payload.dtype} tensor of shape {tuple(m.payload.shape)} "
            f"from rank {m.src} into a {out.dtype} buffer of shape {tuple(out.shape)}; sender "
            "and receiver must agree on the message layout")
    out.copy_(m.payload)
