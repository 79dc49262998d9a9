"""`TorchComm.exchange`'s messages: receives posted ahead, waited for all at once, and sends.

Algorithms whose peers and message layouts follow from the shared seed (sgp, crossover) know what
they will receive before it is sent, so each receive goes to gloo at once, before this rank's
sends, on exchange's channel (`wire.X_TAG`), into buffers of the sizes the message will have. A
sender's message then moves as soon as it is sent, with no header round trip (the mailbox's path:
header in, payload receive posted, payload out), and the messages of every peer move at once.
A message below `wire.SPLIT_BYTES` of payload is one gloo message, its header then its payload
(`wire.packed`), copied in at the sender and out at the receiver; a larger one is its header,
then its payload on `wire.X_BODY_TAG`, received straight into the caller's tensor (contiguous,
on the CPU; otherwise into a buffer): a copy of a large payload costs more than a second,
pipelined, message.

Each header is checked once it is in, before the payload is waited for: the magic number, the
kind, the sequence number of the pair on this channel, and the dtype and shape the receiver
expected (a mismatch is a `ProtocolError` naming the sender). Nothing is allocated from what a
header says: every size comes from the posted receive. A message larger than the posted receive
makes gloo abort this process, as on the mailbox path when a payload is larger than its own
header says; a smaller one is caught by its header. The header receive of a split message has
room for any packed one, so a sender that disagrees about the layout across `SPLIT_BYTES` is a
`ProtocolError` too. A payload taken straight into the caller's tensor is there before its header
is checked; after a `ProtocolError` the tensor's contents are undefined (and the communicator
refuses further work, as after any rejected header).

Waiting: one ``wait`` after another on the caller's thread, each with what is left of the
timeout: every receive was posted at once, so waiting in order costs nothing. A gloo wait that
times out closes every connection of the process (measured on torch 2.13), so after a timeout
the others are only asked whether they completed, the ranks whose messages did not are named,
and the communicator refuses further work.

`Started` (`TorchComm.exchange_start`) posts the same way but returns at once: OSGP mixes step
t's shares in up to ``synch_freq`` steps later, and asks in between whether they are in. A gloo
receive learns that it completed only inside ``wait`` (``is_completed()`` stays False), and a
``wait`` that times out closes connections, so one thread per sender waits for that sender's
started receives, in the order they were posted (checking each header before waiting for its
payload), and records each outcome; ``done`` reads the records, and ``Started.wait`` waits on them
with its own timeout, leaving gloo's connections intact (the communicator still refuses work
after a timeout: a receive is still posted). Payloads held in buffers are copied out on the
caller's thread.

Sends (`Sender`): `exchange` returns only once its sends have left (MPI_Sendrecv), so a split
message from a contiguous CPU tensor goes straight from it, no copy, and `Receiver.wait` waits
for it after the receives, with what is left of the same timeout (a receiver that never takes
it is named as a silent sender would be; a failure excused by a declared death counts the
receiver as unsent). `exchange_start`'s caller goes on computing while its sends are in flight,
and packed messages are built anyway, so those are buffered, as ``send``'s are: the payload is
copied and the outbox's thread waits for the send.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distsgd.comm.base import check_exchange
from distsgd.comm.torch import wire
from distsgd.comm.torch.mailbox import FOREVER, Outbox, PeerLost, first_line, started
from distsgd.errors import CommTimeout, ProtocolError, check_range

# What a wait is given once another has timed out: enough to report a completed receive.
_ASK = timedelta(milliseconds=1)


def check_layouts(tensors: Sequence[torch.Tensor]) -> None:
    """`wire.header`'s UsageError for a tensor no message can carry, before anything is posted
    (without building a header for the others)."""
    for tensor in tensors:
        if tensor.dtype not in wire.DTYPES or tensor.dim() > wire.MAX_DIMS:
            wire.header(wire.DATA, tensor)


@dataclass
class _Posted:
    """One receive under way for `out`: its header (packed: and payload) into `head`; a split
    payload (`wire.SPLIT_BYTES`) into `out` itself, or into `body` if `out` is not contiguous."""

    src: int
    out: torch.Tensor
    number: int  # the sequence number its header must carry
    head: torch.Tensor
    head_work: Any
    body: torch.Tensor | None = None
    body_work: Any = None
    finished: bool = False  # (started receives) its sender's thread is done with it
    error: str | None = None  # ... and gloo failed it with this
    rejected: str | None = None  # ... or its header was rejected, for this reason


@dataclass
class Outcome:
    """What became of a batch of receives, for the communicator to turn into errors."""

    missing: list[int] = field(default_factory=list)  # peers whose messages did not move
    failed: list[tuple[int, str]] = field(default_factory=list)  # (sender, gloo's error)
    rejected: str | None = None  # why a header was rejected
    dead: set[int] = field(default_factory=set)  # senders excused by a declared death
    unsent: set[int] = field(default_factory=set)  # ... and receivers of a direct send

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

    def gloo_failed(self, peer: int, text: str, excused: Callable[[int], bool],
                    sent: bool = False) -> None:
        """File a receive from `peer` (`sent`: a send to it) that gloo failed with `text`."""
        if self.missing or "timed out" in text.lower():
            self.missing.append(peer)
        elif peer in self.dead or peer in self.unsent or excused(peer):
            (self.unsent if sent else self.dead).add(peer)
        else:
            self.failed.append((peer, text))


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

    def _buffer(self, size: int) -> torch.Tensor:
        spare = self._spare.get(size)
        return spare.pop() if spare else torch.empty(size, dtype=torch.uint8)

    def _recycle(self, p: _Posted) -> None:
        for buffer in (p.head, p.body):
            if buffer is not None:
                self._spare.setdefault(buffer.numel(), []).append(buffer)

    def post(self, out: torch.Tensor, src: int) -> _Posted:
        """Post the receive of `src`'s next exchange message for `out`; gloo's RuntimeError if
        it refuses at once (the connection is closed)."""
        size = out.numel() * out.element_size()
        split = size >= wire.SPLIT_BYTES
        # room for any packed message, so that a sender that packs is rejected, not fatal
        head = self._buffer(wire.HEADER_BYTES + (wire.SPLIT_BYTES if split else size))
        head[:wire.HEADER_BYTES].zero_()  # a short message must not pass for a whole one
        posted = _Posted(src, out, self._expected[src], head,
                         started(dist.irecv(head, src, tag=wire.X_TAG)))
        self._expected[src] += 1
        if split:
            if out.is_contiguous() and out.device.type == "cpu":
                into = out.view(-1).view(torch.uint8)
            else:
                into = posted.body = self._buffer(size)
            posted.body_work = started(dist.irecv(into, src, tag=wire.X_BODY_TAG))
        return posted

    def wait(self, posted: list[_Posted], seconds: float,
             sent: Sequence[tuple[int, Any]] = ()) -> Outcome:
        """Wait up to `seconds` in all for every posted receive, then for every direct send
        `sent` as (receiver, work); check each header and fill each `out`."""
        deadline = time.monotonic() + seconds
        outcome = Outcome()
        for p in posted:
            if not self._waited(p.src, p.head_work, outcome, deadline) or outcome.rejected:
                continue
            outcome.rejected = self._check(p)
            if outcome.rejected is None and (p.body_work is None or self._waited(
                    p.src, p.body_work, outcome, deadline)):
                self._deliver(p)
        for dst, work in sent:
            if dst not in outcome.unsent:
                self._waited(dst, work, outcome, deadline, sent=True)
        return outcome

    def _waited(self, peer: int, work: Any, outcome: Outcome, deadline: float,
                sent: bool = False) -> bool:
        """Whether `work` (a receive from, or (`sent`) a send to, `peer`) completed in time; if
        not, filed in `outcome`."""
        try:
            left = timedelta(seconds=max(deadline - time.monotonic(), 1e-3))
            if work.wait(_ASK if outcome.missing else left) is False:
                raise RuntimeError("timed out")
            return True
        except RuntimeError as e:
            outcome.gloo_failed(peer, first_line(e), self._excused, sent)
            return False

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
            error = rejected = None
            try:  # never times out: a timed-out wait closes connections
                p.head_work.wait(FOREVER)
                rejected = self._check(p)  # a payload that will never come is not waited for
                if rejected is None and p.body_work is not None:
                    p.body_work.wait(FOREVER)
            except RuntimeError as e:
                error = first_line(e)
            with self._cond:
                queue.popleft()
                p.finished, p.error, p.rejected = True, error, rejected
                self._cond.notify_all()

    def finished(self, posted: list[_Posted]) -> bool:
        """Whether every one of `posted` (`watch`ed) has completed or failed; never blocks."""
        with self._cond:
            return all(p.finished for p in posted)

    def collect(self, posted: list[_Posted], seconds: float) -> Outcome:
        """`wait` for receives handed to `watch`: up to `seconds` for their threads to finish
        them; fill each `out`."""
        with self._cond:
            self._cond.wait_for(lambda: all(p.finished for p in posted), seconds)
            outcome = Outcome(missing=[p.src for p in posted if not p.finished])
        for p in posted:
            if not p.finished or outcome.rejected:
                continue
            if p.error is not None:
                outcome.gloo_failed(p.src, p.error, self._excused)
            elif p.rejected is not None:
                outcome.rejected = p.rejected
            else:
                self._deliver(p)
        return outcome

    def _check(self, p: _Posted) -> str | None:
        """Why `p`'s header does not describe what the receiver expected (None: it does)."""
        values = p.head[:wire.HEADER_BYTES].view(torch.int64).tolist()
        try:
            kind, dtype, shape = wire.parse_header(values)
            if kind != wire.DATA:
                raise ValueError(f"kind {kind} on the exchange channel (expected {wire.DATA})")
        except ValueError as e:
            return f"rank {self._rank} rejected a message from rank {p.src}: {e}"
        if values[wire.SEQ] != p.number:
            return (f"rank {self._rank} rejected a message from rank {p.src}: it is number "
                    f"{values[wire.SEQ]}, not {p.number}: a message was lost")
        if dtype != p.out.dtype or tuple(shape) != tuple(p.out.shape):
            return (f"rank {self._rank} received a {dtype} tensor of shape {tuple(shape)} from "
                    f"rank {p.src} into a {p.out.dtype} buffer of shape {tuple(p.out.shape)}; "
                    "sender and receiver must agree on the message layout")
        return None

    def _deliver(self, p: _Posted) -> None:
        """Copy a payload received into a buffer (packed, or `body`) into `out`."""
        if p.body_work is None and p.out.numel():
            size = p.out.numel() * p.out.element_size()
            payload = p.head[wire.HEADER_BYTES:wire.HEADER_BYTES + size]
            p.out.copy_(payload.view(p.out.dtype).view(p.out.shape))
        elif p.body is not None:
            p.out.copy_(p.body.view(p.out.dtype).view(p.out.shape))
        self._recycle(p)


class Sender:
    """Posts `exchange`'s sends, numbered per receiver: buffered (the payload copied, the outbox's
    thread waits for the send) or direct (see `post`)."""

    def __init__(self, world_size: int, outbox: Outbox) -> None:
        self._outbox = outbox
        self._numbers = [0] * world_size

    def post(self, tensor: torch.Tensor, dst: int,
             direct: list[tuple[int, Any]] | None = None) -> None:
        """Start sending `tensor` to `dst`'s next exchange receive from this rank; gloo's
        RuntimeError if it refuses at once (the connection is closed). Given `direct`, a split
        message from a contiguous CPU tensor goes without a copy, its works appended to `direct`
        as (dst, work): the caller must wait for them before the tensor may change."""
        size = tensor.numel() * tensor.element_size()
        number = self._numbers[dst]
        if size < wire.SPLIT_BYTES:
            message = wire.packed(tensor, number, self._outbox.spare(wire.HEADER_BYTES + size))
            work = started(dist.isend(message, dst, tag=wire.X_TAG))
            self._numbers[dst] += 1
            self._outbox.track(dst, [(work, message, True)])
        elif direct is not None and tensor.is_contiguous() and tensor.device.type == "cpu":
            posted: list[tuple[Any, torch.Tensor, bool]] = []
            try:
                self._split(tensor, tensor.detach().reshape(-1).view(torch.uint8), dst, False,
                            lambda _, sent: posted.extend(sent))
            except RuntimeError:
                self._outbox.track(dst, posted)  # the header went: the outbox waits for it
                raise
            direct.extend((dst, work) for work, _, _ in posted)
        else:
            body = self._outbox.spare(size)
            body = torch.empty(size, dtype=torch.uint8) if body is None else body
            body.view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
            self._split(tensor, body, dst, True, self._outbox.track)

    def _split(self, tensor: torch.Tensor, body: torch.Tensor, dst: int, reuse: bool,
               track: Callable[[int, list[tuple[Any, torch.Tensor, bool]]], None]) -> None:
        """Send `tensor`'s header, then `body` (its bytes) on `wire.X_BODY_TAG`; `track` the
        works posted, even when the second is refused."""
        header = wire.header(wire.DATA, tensor, self._numbers[dst])
        sent = [(started(dist.isend(header, dst, tag=wire.X_TAG)), header, False)]
        self._numbers[dst] += 1
        try:
            sent.append((started(dist.isend(body, dst, tag=wire.X_BODY_TAG)), body, reuse))
        finally:
            track(dst, sent)


class Started:
    """`TorchComm.exchange_start`'s `Exchange`: `posted` watched by `receiver` (see the module
    docstring); `refuse(why)` makes the communicator refuse further work."""

    def __init__(self, receiver: Receiver, posted: list[_Posted], unsent: frozenset[int],
                 dead: frozenset[int], rank: int, timeout: float,
                 refuse: Callable[[str], None]) -> None:
        self._receiver, self._posted, self._unsent, self._dead = receiver, posted, unsent, dead
        self._rank, self._timeout, self._refuse = rank, timeout, refuse
        self._result: tuple[frozenset[int], frozenset[int]] | None = None
        receiver.watch(posted)

    @property
    def unsent(self) -> frozenset[int]:
        return self._unsent

    def done(self) -> bool:
        return self._result is not None or self._receiver.finished(self._posted)

    def wait(self, timeout: float | None = None) -> tuple[frozenset[int], frozenset[int]]:
        if self._result is not None:
            return self._result
        seconds = self._timeout if timeout is None else timeout
        check_range("timeout", seconds, 0.0, low_open=True)
        outcome = self._receiver.collect(self._posted, seconds)
        error = outcome.error(self._rank, seconds)
        if error is not None:
            self._refuse("an exchange failed")  # a receive may still be posted
            raise error
        self._result = self._unsent, self._dead | frozenset(outcome.dead)
        return self._result


def post_all(receiver: Receiver, send: Callable[[torch.Tensor, int], bool],
             sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]],
             rank: int, world_size: int, dead: frozenset[int],
             refused: Callable[[RuntimeError], Exception],
             ) -> tuple[list[_Posted], frozenset[int], frozenset[int]]:
    """What `exchange` and `exchange_start` share: the arguments checked, every receive from a
    live rank posted, then every send to one (`send(tensor, dst)`: False if `dst` died
    meanwhile); the posted receives, the peers not sent to (dead, or dying during the send) and
    the dead peers not received from. A receive that gloo refuses raises `refused(its error)`."""
    check_exchange(sends, recvs, rank, world_size)
    check_layouts([tensor for tensor, _ in [*sends, *recvs]])
    try:
        posted = [receiver.post(out, src) for out, src in recvs if src not in dead]
    except RuntimeError as e:
        raise refused(e) from e
    unsent: set[int] = set()
    for tensor, dst in sends:
        if dst in dead or dst in unsent or not send(tensor, dst):
            unsent.add(dst)
    return posted, frozenset(unsent), frozenset(src for _, src in recvs if src in dead)
