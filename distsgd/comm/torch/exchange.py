"""The receiving half of `TorchComm.exchange`: receives posted ahead, waited for all at once.

Algorithms whose peers and message layouts follow from the shared seed (sgp, crossover) know what
they will receive before it is sent, so each receive goes to gloo at once, before this rank's
sends, on exchange's channel (`wire.X_TAG`), into a buffer of the size the message will have:
its header, then its payload (`wire.packed`). A sender's message then moves as soon as it is
sent, as one gloo message with no header round trip (the mailbox's path: header in, payload
receive posted, payload out), and the messages of every peer move at once.

Each header is still checked once it is in: the magic number, the kind, the sequence number of
the pair on this channel, and the dtype and shape the receiver expected (a mismatch is a
`ProtocolError` naming the sender). Nothing is allocated from what a header says. A message
larger than the posted receive makes gloo abort this process, as on the mailbox path when a
payload is larger than its own header says; a smaller one is caught by its header.

Waiting: one ``wait`` after another on the caller's thread, each with what is left of the
timeout: every receive was posted at once, so waiting in order costs nothing. A gloo wait that
times out closes every connection of the process (measured on torch 2.13), so after a timeout
the others are only asked whether they completed, the ranks whose messages did not are named,
and the communicator refuses further work.

`exchange_start` (`start`, `Started`) posts the same way but returns at once: OSGP mixes step
t's shares in up to ``synch_freq`` steps later, and asks in between whether they are in. A gloo
receive learns that it completed only inside ``wait`` (``is_completed()`` stays False), and a
``wait`` that times out closes connections, so one thread per sender waits for that sender's
started receives, in the order they were posted, and records each outcome; ``done`` reads the
records, and ``Started.wait`` waits on them with its own timeout, leaving gloo's connections
intact (the communicator still refuses work after a timeout: a receive is still posted). The
headers are checked, and the payloads copied out, on the caller's thread, as above.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distsgd.comm.base import check_exchange, nbytes
from distsgd.comm.torch import wire
from distsgd.comm.torch.mailbox import FOREVER, PeerLost, first_line, started
from distsgd.errors import CommTimeout, PeerDied, ProtocolError, check_range

if TYPE_CHECKING:  # the communicator calls `start`: no import at run time, no cycle
    from distsgd.comm.torch.comm import TorchComm

# What a wait is given once another has timed out: enough to report a completed receive.
_ASK = timedelta(milliseconds=1)


@dataclass
class _Posted:
    """One receive under way into `buffer` (`wire.packed`'s layout), for `out`."""

    src: int
    out: torch.Tensor
    buffer: torch.Tensor
    number: int  # the sequence number its header must carry
    work: Any
    finished: bool = False  # (started receives) its sender's thread has waited for it
    error: str | None = None  # ... and gloo failed it with this


@dataclass
class Outcome:
    """What became of a batch of receives, for the communicator to turn into errors."""

    missing: list[int] = field(default_factory=list)  # senders whose messages did not come
    failed: list[tuple[int, str]] = field(default_factory=list)  # (sender, gloo's error)
    rejected: str | None = None  # why a header was rejected
    dead: set[int] = field(default_factory=set)  # senders excused by a declared death

    def error(self, rank: int, seconds: float) -> Exception | None:
        """What rank `rank`'s exchange raises (None: it succeeded)."""
        if self.rejected is not None:
            return ProtocolError(self.rejected)
        if self.missing:
            return CommTimeout(f"rank {rank}: exchange timed out after {seconds:g} s waiting for "
                               f"rank(s) {sorted(set(self.missing))} (slow, stuck or dead)")
        if self.failed:
            src, text = self.failed[0]
            return PeerLost(f"rank {rank}: exchange with rank {src} failed: it crashed or ended "
                            f"without closing its communicator (gloo: {text})")
        return None


class Receiver:
    """Posts and completes `exchange`'s receives; keeps the numbers expected per sender.

    `excused(src)`: whether a failed receive from `src` is explained by its declared death
    (``--on-failure continue``); it may wait a little for the launcher to declare it.
    """

    def __init__(self, rank: int, world_size: int, excused: Callable[[int], bool]) -> None:
        self._rank = rank
        self._expected = [0] * world_size
        self._excused = excused
        # receive buffers by size, reused: a step's messages are the size of the last step's
        self._spare: dict[int, list[torch.Tensor]] = {}
        # started receives (`watch`) not yet waited for, per sender, each with its thread
        self._watched: dict[int, collections.deque[_Posted]] = {}
        self._cond = threading.Condition()

    def post(self, out: torch.Tensor, src: int) -> _Posted:
        """Post the receive of `src`'s next exchange message for `out`; gloo's RuntimeError if
        it refuses at once (the connection is closed)."""
        size = wire.HEADER_BYTES + out.numel() * out.element_size()
        spare = self._spare.get(size)
        buffer = spare.pop() if spare else torch.empty(size, dtype=torch.uint8)
        buffer[:wire.HEADER_BYTES].zero_()  # a short message must not pass for a whole one
        posted = _Posted(src, out, buffer, self._expected[src],
                         started(dist.irecv(buffer, src, tag=wire.X_TAG)))
        self._expected[src] += 1
        return posted

    def wait(self, posted: list[_Posted], seconds: float) -> Outcome:
        """Wait up to `seconds` in all for every posted receive; check each header and fill
        each `out`."""
        deadline = time.monotonic() + seconds
        outcome = Outcome()
        for p in posted:
            try:
                left = timedelta(seconds=max(deadline - time.monotonic(), 1e-3))
                if p.work.wait(_ASK if outcome.missing else left) is False:
                    raise RuntimeError("timed out")
            except RuntimeError as e:
                text = first_line(e)
                if outcome.missing or "timed out" in text.lower():
                    outcome.missing.append(p.src)
                elif p.src in outcome.dead or self._excused(p.src):
                    outcome.dead.add(p.src)
                else:
                    outcome.failed.append((p.src, text))
                continue
            if outcome.rejected is None:
                outcome.rejected = self._check(p)
                self._spare.setdefault(p.buffer.numel(), []).append(p.buffer)
        return outcome

    def watch(self, posted: list[_Posted]) -> None:
        """Have each of `posted` waited for on its sender's thread (`finished`, `collect`)."""
        with self._cond:
            for p in posted:
                queue = self._watched.get(p.src)
                if queue is None:
                    queue = self._watched[p.src] = collections.deque()
                    threading.Thread(target=self._watch, args=(queue,), daemon=True,
                                     name=f"distsgd-exchange-{p.src}").start()
                queue.append(p)
            self._cond.notify_all()

    def _watch(self, queue: collections.deque[_Posted]) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: queue)
                p = queue[0]
            error = None
            try:
                p.work.wait(FOREVER)  # never times out: a timed-out wait closes connections
            except RuntimeError as e:
                error = first_line(e)
            with self._cond:
                queue.popleft()
                p.finished, p.error = True, error
                self._cond.notify_all()

    def finished(self, posted: list[_Posted]) -> bool:
        """Whether every one of `posted` (`watch`ed) has completed or failed; never blocks."""
        with self._cond:
            return all(p.finished for p in posted)

    def collect(self, posted: list[_Posted], seconds: float) -> Outcome:
        """`wait` for receives handed to `watch`: up to `seconds` for their threads to finish
        them; check each header and fill each `out`."""
        with self._cond:
            self._cond.wait_for(lambda: all(p.finished for p in posted), seconds)
            outcome = Outcome(missing=[p.src for p in posted if not p.finished])
        for p in posted:
            if not p.finished:
                continue
            if p.error is not None:
                if p.src in outcome.dead or self._excused(p.src):
                    outcome.dead.add(p.src)
                else:
                    outcome.failed.append((p.src, p.error))
            elif outcome.rejected is None:
                outcome.rejected = self._check(p)
                self._spare.setdefault(p.buffer.numel(), []).append(p.buffer)
        return outcome

    def _check(self, p: _Posted) -> str | None:
        """Why `p`'s header does not describe what the receiver expected (None: it does), and
        the payload copied into the caller's tensor if it was staged."""
        header = p.buffer[:wire.HEADER_BYTES].view(torch.int64)
        try:
            kind, dtype, shape = wire.parse_header(header.tolist())
            if kind != wire.DATA:
                raise ValueError(f"kind {kind} on the exchange channel (expected {wire.DATA})")
        except ValueError as e:
            return f"rank {self._rank} rejected a message from rank {p.src}: {e}"
        number = int(header[wire.SEQ])
        if number != p.number:
            return (f"rank {self._rank} rejected a message from rank {p.src}: it is number "
                    f"{number}, not {p.number}: a message was lost")
        if dtype != p.out.dtype or tuple(shape) != tuple(p.out.shape):
            return (f"rank {self._rank} received a {dtype} tensor of shape {tuple(shape)} from "
                    f"rank {p.src} into a {p.out.dtype} buffer of shape {tuple(p.out.shape)}; "
                    "sender and receiver must agree on the message layout")
        if p.out.numel():
            p.out.copy_(p.buffer[wire.HEADER_BYTES:].view(dtype).view(p.out.shape))
        return None


class Started:
    """`TorchComm.exchange_start`'s `Exchange` (see the module docstring)."""

    def __init__(self, comm: TorchComm, posted: list[_Posted], unsent: frozenset[int],
                 dead: frozenset[int]) -> None:
        self._comm, self._posted, self._unsent, self._dead = comm, posted, unsent, dead
        self._result: tuple[frozenset[int], frozenset[int]] | None = None

    @property
    def unsent(self) -> frozenset[int]:
        return self._unsent

    def done(self) -> bool:
        return self._result is not None or self._comm._receiver.finished(self._posted)

    def wait(self, timeout: float | None = None) -> tuple[frozenset[int], frozenset[int]]:
        if self._result is not None:
            return self._result
        seconds = self._comm.timeout if timeout is None else timeout
        check_range("timeout", seconds, 0.0, low_open=True)
        outcome = self._comm._receiver.collect(self._posted, seconds)
        error = outcome.error(self._comm.rank, seconds)
        if error is not None:
            self._comm._broken = "an exchange failed"  # a receive may still be posted
            raise error
        self._result = self._unsent, self._dead | frozenset(outcome.dead)
        return self._result


def post_all(comm: TorchComm, sends: Sequence[tuple[torch.Tensor, int]],
             recvs: Sequence[tuple[torch.Tensor, int]], verb: str, seconds: float,
             ) -> tuple[list[_Posted], frozenset[int], frozenset[int]]:
    """What `exchange` and `start` share: the arguments checked, every receive from a live rank
    posted, then every send to one; the posted receives, the peers not sent to (dead, or dying
    during the send) and the dead peers not received from."""
    check_exchange(sends, recvs, comm.rank, comm.world_size)
    for tensor, _ in [*sends, *recvs]:
        wire.header(wire.DATA, tensor)  # a UsageError before anything is posted
    dead = comm.dead
    try:
        posted = [comm._receiver.post(out, src) for out, src in recvs if src not in dead]
    except RuntimeError as e:
        comm._broken = "an exchange failed to start"
        raise comm._failure(verb, None, seconds, e) from e
    unsent: set[int] = set()
    for tensor, dst in sends:
        if dst in dead or dst in unsent:
            unsent.add(dst)
            continue
        try:
            comm._post(None, tensor, dst)
        except PeerDied:
            unsent.add(dst)
            continue
        comm._counter.add("send", nbytes(tensor))
    return posted, frozenset(unsent), frozenset(src for _, src in recvs if src in dead)


def start(comm: TorchComm, sends: Sequence[tuple[torch.Tensor, int]],
          recvs: Sequence[tuple[torch.Tensor, int]]) -> Started:
    """`TorchComm.exchange_start`: `post_all`, each receive then waited for on its sender's
    thread (`Receiver.watch`), so `done()` never blocks."""
    comm._check_usable("exchange_start")
    posted, unsent, dead = post_all(comm, sends, recvs, "exchange_start", comm.timeout)
    comm._receiver.watch(posted)
    return Started(comm, posted, unsent, dead)
