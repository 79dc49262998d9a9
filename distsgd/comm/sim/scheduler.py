"""The simulator's scheduler: N workers, one baton, virtual time order, deadlock detection.

Each simulated worker is a greenlet, and all of them run in the thread that calls `run`, one at a
time: the one holding the baton. Whenever a worker blocks or charges time, it picks the worker
that can make progress at the smallest virtual time (ties by rank) and switches straight to it,
or keeps running if that is itself. This is a conservative discrete-event simulation: a message
sent at virtual time t can never arrive before t, and no worker runs while another could still act
at an earlier time, so an any-source ``recv`` always gets the message that arrives first in virtual
time, and a run replays bit for bit.

Keys. Each worker has one: (clock, rank) when it is ready; (max(clock, arrival of the message it
would take), rank) when it waits in ``recv`` and such a message is on its way; and `_IDLE`, after
every other key, when it cannot act (a ``recv`` with nothing to take, a collective that others
have yet to join, held, done, failed). `Scheduler._keys` holds them, updated wherever a state, a
clock or a waiting receiver's inbox changes. The worker with the smallest key runs. It goes on
only while its key is still the smallest, and nothing it does moves another worker to an earlier
time: a message sent at t arrives at t or later, a collective ends no earlier than its members'
clocks. When it must stop, it switches to the worker with the smallest key; if no worker can act,
to the greenlet that called `run`, which then ends the run: all done, a failure, or a deadlock (no
worker can act while some are unfinished). A worker that finishes returns to `run`, which passes
the baton on.

Why greenlets: a switch between greenlets costs about a microsecond and stays on one core with
warm caches; a hand-off between OS threads cost ~100 µs per switch here, two per worker-step
(benchmarks/sim_overhead.py). What the OS would keep per thread is kept per worker instead: the
current communicator is a context variable (each greenlet has its own context), and torch's grad
mode is saved and restored around every switch. Other torch thread-local state (inference mode,
autocast, a CUDA device set with ``torch.cuda.set_device``) is shared by all workers: a worker
must not block inside such a context.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from greenlet import greenlet

from distsgd.comm.base import ByteCounter
from distsgd.errors import DeadlockError, UsageError, WorkerFailure

# The key of a worker that cannot act: after every real key (clock, rank), even an infinite clock.
_IDLE: tuple[float, int] = (math.inf, sys.maxsize)


class _Aborted(BaseException):
    """Raised inside a worker to unwind it when the world stops (deadlock or failure)."""


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
    clock: float = 0.0
    state: str = "ready"  # ready | recv | collective | held | done | failed
    recv_src: int | None = None
    collective: _Collective | None = None
    inbox: list[_Message] = field(default_factory=list)
    exposed: dict[str, Callable[[], Any]] = field(default_factory=dict)
    counter: ByteCounter = field(default_factory=ByteCounter)
    debt: float = 0.0  # CPU seconds that moving bytes still owes (`NetworkModel.cpu_per_byte`)
    sending: list[tuple[float, float]] = field(default_factory=list)  # (has left, its CPU)
    result: Any = None
    error: BaseException | None = None
    greenlet: greenlet | None = None  # made by `Scheduler._run`; switched to for the baton

    def candidate(self) -> _Message | None:
        """The first message (in virtual arrival order) that the pending recv would take."""
        best = None
        for m in self.inbox:
            if self.recv_src is not None and m.src != self.recv_src:
                continue
            if best is None or (m.arrival, m.seq) < (best.arrival, best.seq):
                best = m
        return best

    def key(self) -> tuple[float, int]:
        """When this worker could act next, as (virtual time, rank); `_IDLE` when it cannot."""
        if self.state == "ready":
            return (self.clock, self.rank)
        if self.state == "recv":
            m = self.candidate()
            if m is not None:
                return (max(self.clock, m.arrival), self.rank)
        return _IDLE

    def describe(self) -> str:
        if self.state == "recv":
            who = "any sender" if self.recv_src is None else f"rank {self.recv_src}"
            return f"rank {self.rank}: blocked in recv from {who} at t={self.clock:.6g}s"
        if self.state == "collective" and self.collective is not None:
            c = self.collective
            return (f"rank {self.rank}: blocked in {c.verb} on group {list(c.group)} "
                    f"({len(c.arrived)}/{len(c.group)} arrived) at t={self.clock:.6g}s")
        return f"rank {self.rank}: {self.state} at t={self.clock:.6g}s"


class Scheduler:
    """Runs one body per worker, one worker at a time, in virtual time order (module docstring)."""

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be at least 1")
        self.world_size = world_size
        self._workers = [_Worker(r) for r in range(world_size)]
        self._keys = [w.key() for w in self._workers]
        self._main: greenlet | None = None  # the caller of `run`: told when the run is over
        self._aborting = False
        self._started = False
        self._hold: tuple[Callable[[], None], frozenset[int]] | None = None  # see `hold`
        self._hold_ran = False

    # ----------------------------------------------------------------- driving the run
    def _run(self, bodies: Sequence[Callable[[], Any]]) -> list[Any]:
        """Call each worker's body (rank order) and return their results, or raise the failure
        or the deadlock that ended the run."""
        if self._started:
            raise RuntimeError("a SimWorld runs once: make a new one for another run")
        self._started = True
        self._main = greenlet.getcurrent()
        for w, body in zip(self._workers, bodies, strict=True):
            w.greenlet = greenlet(functools.partial(self._body, body, w))  # its parent: us
        grad = torch.is_grad_enabled()
        failure: BaseException | None = None
        try:
            nxt = self._next()  # rank 0: every clock is still 0
            while nxt is not None:  # a worker that finishes returns here with its successor
                assert nxt.greenlet is not None
                nxt = nxt.greenlet.switch()
            # At most one worker fails: the one that did stops the run.
            failure = next((w.error for w in self._workers if w.state == "failed"), None)
        finally:
            self._abort_all()
            torch.set_grad_enabled(grad)
        if failure is not None:
            raise self._wrap(failure)
        blocked = [w for w in self._workers if w.state not in ("done", "failed")]
        if blocked:
            states = "; ".join(w.describe() for w in self._workers)
            raise DeadlockError(f"every live simulated worker is blocked: {states}")
        return [w.result for w in self._workers]

    def _wrap(self, error: BaseException) -> BaseException:
        rank = next(w.rank for w in self._workers if w.error is error)
        if isinstance(error, (WorkerFailure, DeadlockError, UsageError)):
            # Errors of the user's own making (bad hyperparameters found in init) keep their
            # type so the CLI reports them as such.
            return error
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit
            return error
        wrapped = WorkerFailure(f"simulated worker {rank} failed at "
                                f"t={self._workers[rank].clock:.6g}s: {error!r}")
        wrapped.__cause__ = error
        return wrapped

    def _body(self, body: Callable[[], Any], w: _Worker) -> _Worker | None:
        """A worker's whole life; returns the worker to run next (None: the run is over)."""
        torch.set_grad_enabled(True)  # each worker starts as a new thread would
        try:
            w.result = body()
            w.state = "done"
        except _Aborted:
            return None
        except BaseException as e:  # reported to the caller of run()
            w.error = e
            w.state = "failed"
        self._keys[w.rank] = _IDLE
        if self._aborting or w.state == "failed":  # a failure ends the run
            return None
        try:
            return self._successor()
        except BaseException as e:  # a hold's action failed in this finishing worker
            w.error, w.state = e, "failed"
            return None

    def _abort_all(self) -> None:
        """Resume every suspended worker with `_aborting` set, so that each unwinds; a worker
        that never started is dropped without running."""
        self._aborting = True
        for w in self._workers:
            if w.greenlet:  # started and not finished: parked in `_yield`
                w.greenlet.switch()

    # ----------------------------------------------------------------------- scheduling
    def _rekey(self, w: _Worker) -> None:
        self._keys[w.rank] = w.key()

    def _next(self) -> _Worker | None:
        """The worker with the smallest key; None when no worker can act."""
        key = min(self._keys)  # keys are distinct (one rank each): ties cannot arise
        return None if key is _IDLE else self._workers[key[1]]

    def _is_next(self, w: _Worker) -> bool:
        """True when no other worker could act before `w` (whose key must be current)."""
        return min(self._keys)[1] == w.rank

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

    def _yield(self, w: _Worker) -> None:
        """Switch to the next worker (or back to `run` if none can act) until `w` is resumed.

        Callers yield only when another worker is next or `w` cannot act; were `w` next itself
        (a hold released), it goes on at once.
        """
        if self._aborting:  # a verb called while unwinding (a `finally` in user code)
            raise _Aborted()
        nxt = self._successor()
        grad = torch.is_grad_enabled()  # thread-local in torch: each worker keeps its own
        if nxt is None or (nxt is not w and not nxt.greenlet):
            # Nobody can act, or the next worker has not started: `run` starts it from its own
            # shallow stack. A greenlet started here would inherit this worker's Python
            # recursion depth, and 100+ workers started one inside another hit the limit.
            assert self._main is not None
            self._main.switch(nxt)
        elif nxt is not w:
            assert nxt.greenlet is not None
            nxt.greenlet.switch()
        if torch.is_grad_enabled() != grad:  # another worker changed it meanwhile
            torch.set_grad_enabled(grad)
        if self._aborting:
            raise _Aborted()

    def hold(self, rank: int, action: Callable[[], None], quorum: Collection[int]) -> bool:
        """Park `rank` outside virtual time until no worker of the world can act any more (every
        other one is held, done, or waiting for a message that nobody will send). Then, if every
        rank of `quorum` is held, `action` runs once, in whichever worker finds the world quiet;
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
