"""TorchComm's transport over gloo point-to-point: the mailbox thread and the outbox.

gloo's behaviour shapes it (measured on torch 2.13):

- gloo's point-to-point is a rendezvous: an ``isend`` completes only once the receiver posts a
  matching receive of the right size (a larger buffer is silently part-filled, a smaller one
  aborts the process), and a process that exits with a send in flight loses the message.
- a gloo p2p work learns it completed only inside ``wait()`` (``is_completed()`` stays False),
  and a ``wait`` that times out closes the connection ("Application timeout caused pair
  closure"); an any-source recv that times out closes every connection.

So a thread (`Mailbox`) receives every header (`distsgd.comm.torch.wire`) as soon as it is
sent, from any sender, and posts the payload's receive at once; one thread per sender waits for
that sender's payloads in order and files them in a local inbox that the verbs read with their
own timeouts, leaving the connections intact. Payloads from several senders so travel at once,
and a sender that stalls after its header holds up only its own messages. Sends complete at
once: `Outbox` posts each one and a thread waits for it to complete, then frees its payload.
Failures are kept for the owner (`TorchComm`), which turns them into the errors of
`distsgd.comm.base`'s semantics. Nothing here knows a verb. (`exchange`'s receives, whose sender
and layout are known in advance, bypass the mailbox: `distsgd.comm.torch.exchange`.)
"""

from __future__ import annotations

import collections
import math
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distsgd.comm.torch import wire
from distsgd.errors import WorkerFailure

# An explicit wait this long never times out in practice: gloo would otherwise apply the group's
# timeout to a send whose receiver is merely slow, and a timed-out wait closes the connection.
FOREVER = timedelta(days=7)
# How long a receive that failed when a peer's connection reset waits for the launcher to declare
# that peer dead (it notices a dead process at once) before the failure ends the run.
DEATH_GRACE = 10.0


class PeerLost(WorkerFailure):
    """A peer's connection closed: it crashed, or its process ended without `close`.

    Usually the consequence of another worker's failure; the launcher reports that one instead.
    """


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


_FAILED = object()  # a payload receive that gloo refused at once (its sender died)


def started(work: dist.Work | None) -> dist.Work:
    if work is None:  # torch returns None to a rank outside the group; ours holds every rank
        raise RuntimeError("torch.distributed started no operation")
    return work


class Mailbox:
    """Receives every message addressed to this rank, in arrival order per sender, on daemon
    threads: one takes headers from any sender, one per sender waits for its payloads.

    `carry_on` (``--on-failure continue``): a receive that fails because a peer died is excused
    once the launcher declares a death (`mark_dead`), rather than ending the mailbox.
    """

    def __init__(self, rank: int, peers: int, carry_on: bool) -> None:
        self._rank, self._carry_on = rank, carry_on
        # (sender, kind, payload): data and reports wait side by side, taken by kind
        self._inbox: collections.deque[tuple[int, int, torch.Tensor]] = collections.deque()
        self._open = peers  # peers that have not said goodbye (or died)
        self._closed: set[int] = set()
        self._peers = peers
        self._farewells: set[int] = set()  # peers whose goodbye header arrived: no more headers
        self._expected: collections.Counter[int] = collections.Counter()  # next number per sender
        # per sender: messages whose header arrived, in order (kind, payload, its receive or None)
        self._arriving: dict[int, collections.deque[tuple[int, torch.Tensor, Any]]] = {}
        self._arriving_bytes: collections.Counter[int] = collections.Counter()
        self._dead: set[int] = set()
        self._unannounced: list[int] = []  # deaths no any-source recv has reported yet
        self.failure: str | None = None
        self.rejected: str | None = None  # why a message was rejected (ProtocolError)
        self.discarded = 0
        self._excuses = 0  # failed receives that a death explained
        self._last_death = -math.inf  # time.monotonic() of the last mark_dead
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="distsgd-mailbox", daemon=True)
        if peers:
            self._thread.start()

    def _loop(self) -> None:
        header = torch.empty(wire.HEADER_LEN, dtype=torch.int64)
        try:
            while self._expects_headers():
                header.zero_()  # a short header must not inherit the last one's trailer
                work = started(dist.irecv(header, None, tag=wire.HEADER_TAG))
                try:
                    work.wait(FOREVER)
                except RuntimeError:
                    # A peer that dies mid-message resets its connection under the any-source
                    # receive; with carry_on, the launcher declaring a death excuses it.
                    if self._carry_on and self._excused():
                        continue
                    raise
                src = work._source_rank()
                try:
                    kind, dtype, shape = wire.parse_header(header.tolist())
                except ValueError as e:
                    self._reject(f"rank {self._rank} rejected a message from rank {src}: {e}")
                    return  # what follows from that rank cannot be trusted
                # A number out of sequence: never a silent misread of what follows.
                if header[wire.SEQ] != self._expected[src]:
                    self._reject(f"rank {self._rank} rejected a message from rank {src}: it is "
                                 f"number {int(header[wire.SEQ])}, not {self._expected[src]}: "
                                 "a message was lost")
                    return
                self._expected[src] += 1
                if kind == wire.GOODBYE:
                    with self._cond:
                        self._farewells.add(src)
                size = torch.Size(shape).numel() * dtype.itemsize
                # Headers whose payloads have not come may not add up past the limit either
                if self._arriving_bytes[src] + size > wire.MAX_MESSAGE_BYTES:
                    self._reject(f"rank {self._rank} rejected a message from rank {src}: it "
                                 f"announced more than {wire.MAX_MESSAGE_BYTES} bytes of "
                                 "payloads that it has not sent")
                    return
                raw = torch.empty(size, dtype=torch.uint8)
                # Post the payload's receive now, so that it travels while other senders' do
                payload = (None if kind == wire.GOODBYE or not size
                           else self._post_payload(raw, src))
                self._arrive(src, kind, raw.view(dtype).reshape(shape), payload)
        except RuntimeError as e:
            with self._cond:
                self.failure = first_line(e)
                self._cond.notify_all()

    def _expects_headers(self) -> bool:
        with self._cond:
            return len(self._farewells | self._dead) < self._peers

    def _post_payload(self, raw: torch.Tensor, src: int) -> Any:
        try:
            return started(dist.irecv(raw, src, tag=wire.PAYLOAD_TAG))
        except RuntimeError:
            if not self._carry_on:
                raise
            return _FAILED

    def _arrive(self, src: int, kind: int, payload: torch.Tensor, work: Any) -> None:
        """File a message whose header arrived; `src`'s own thread waits for its payload."""
        with self._cond:
            queue = self._arriving.get(src)
            if queue is None:
                queue = self._arriving[src] = collections.deque()
                threading.Thread(target=self._payloads, args=(src, queue), daemon=True,
                                 name=f"distsgd-mailbox-{src}").start()
            queue.append((kind, payload, work))
            self._arriving_bytes[src] += payload.numel() * payload.element_size()
            self._cond.notify_all()

    def _payloads(self, src: int, queue: collections.deque[tuple[int, torch.Tensor, Any]]) -> None:
        """Wait for `src`'s payloads in order; deliver each message (a goodbye: close `src`)."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: queue)
                kind, payload, work = queue[0]
            whole = True
            try:
                if work is _FAILED:
                    raise RuntimeError(f"rank {src}'s connection closed")
                if work is not None:
                    work.wait(FOREVER)
            except RuntimeError as e:
                whole = False
                if self._carry_on:
                    self.mark_dead(src)  # it died between header and payload: drop the half
                else:
                    with self._cond:
                        self.failure = self.failure or first_line(e)
            with self._cond:
                queue.popleft()
                self._arriving_bytes[src] -= payload.numel() * payload.element_size()
                if whole and kind != wire.GOODBYE:
                    self._inbox.append((src, kind, payload))
                self._cond.notify_all()
            if kind == wire.GOODBYE or not whole:
                if kind == wire.GOODBYE:
                    self._close(src)
                return

    def stalled(self) -> list[int]:
        """Senders whose header arrived but whose payload has not (yet)."""
        with self._cond:
            return sorted(src for src, queue in self._arriving.items()
                          if any(work is not None for _, _, work in queue))

    def _reject(self, why: str) -> None:
        with self._cond:
            self.rejected = why
            self._cond.notify_all()

    def _excused(self) -> bool:
        """Whether a failed receive is explained by a death declared within `DEATH_GRACE`
        seconds of it (a few failures per death at most, so a broken group still fails)."""
        failed = time.monotonic()
        with self._cond:
            self._excuses += 1
            if self._excuses > 4 * (len(self._dead) + 1):
                return False
            return self._cond.wait_for(
                lambda: abs(self._last_death - failed) <= DEATH_GRACE, DEATH_GRACE)

    def _close(self, src: int) -> None:
        with self._cond:
            if src not in self._closed:
                self._open -= 1
                self._closed.add(src)
            self._cond.notify_all()

    def mark_dead(self, rank: int) -> None:
        with self._cond:
            if rank in self._dead:
                return
            self._dead.add(rank)
            self._unannounced.append(rank)
            self._last_death = time.monotonic()
        self._close(rank)

    def await_death(self, rank: int, seconds: float) -> bool:
        """Whether `rank` is declared dead within `seconds` (a failed receive from it is then
        explained by its death)."""
        with self._cond:
            return self._cond.wait_for(lambda: rank in self._dead, seconds)

    def dead_ranks(self) -> frozenset[int]:
        with self._cond:
            return frozenset(self._dead)

    def dead_to_announce(self) -> int | None:
        """A death no any-source recv has reported yet (each is reported once), or None."""
        with self._cond:
            return self._unannounced.pop(0) if self._unannounced else None

    def take(self, kind: int, src: int | None,
             seconds: float | None) -> tuple[int, torch.Tensor] | None:
        """The first message of `kind` from `src` (any rank: None), waiting up to `seconds`
        (None: not). Messages that arrived before a death are still delivered."""
        deadline = None if seconds is None else time.monotonic() + seconds
        with self._cond:
            while True:
                for i, (sender, k, payload) in enumerate(self._inbox):
                    if k == kind and (src is None or sender == src):
                        del self._inbox[i]
                        return sender, payload
                if self.failure is not None or self.rejected is not None:
                    return None  # nothing more will come; the caller reports why
                if self._has_closed(src) or (src is None and self._unannounced):
                    return None
                left = 0.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def _has_closed(self, src: int | None) -> bool:
        return not self._open if src is None else src in self._closed

    def has_closed(self, src: int | None) -> bool:
        """Whether `src` (None: every peer) has closed, so that nothing more can come from it."""
        with self._cond:
            return self._has_closed(src)

    def wait_all_closed(self, seconds: float) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._open or self.failure is not None or self.rejected is not None,
                seconds) and not self._open

    def join(self) -> None:
        """Wait for the thread (it ends after the last goodbye); drop what was never taken."""
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
        with self._cond:
            self.discarded += len(self._inbox)
            self._inbox.clear()


class Outbox:
    """Posts messages, and keeps those in flight: one daemon thread waits for each in order,
    then frees its payload.

    gloo offers no way to poll a p2p send without risking its connection (see the module
    docstring), so a thread blocks in ``wait`` instead; failures are kept for the owner.
    """

    def __init__(self, world_size: int) -> None:
        # (work, payload, dst, whether the payload is a buffer to reuse once sent)
        self._queue: collections.deque[tuple[Any, torch.Tensor, int, bool]] = collections.deque()
        self._failures: list[tuple[int, str]] = []
        self._sequence = [0] * world_size  # the next message's number, per receiver
        # sent buffers by size (`track`'s reuse), reused: fresh memory costs a page fault per page
        self._spare: dict[int, list[torch.Tensor]] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def post(self, header: torch.Tensor, payload: torch.Tensor | None, dst: int) -> None:
        """Start sending a message (`wire.header`, then `payload` unless None or empty) to
        `dst`; gloo's RuntimeError if it refuses at once (the connection is closed)."""
        header[wire.SEQ] = self._sequence[dst]
        sent = [(started(dist.isend(header, dst, tag=wire.HEADER_TAG)), header, False)]
        self._sequence[dst] += 1
        try:
            if payload is not None and payload.numel():
                raw = payload.reshape(-1).view(torch.uint8)
                sent.append((started(dist.isend(raw, dst, tag=wire.PAYLOAD_TAG)), payload, False))
        finally:
            self.track(dst, sent)

    def spare(self, size: int) -> torch.Tensor | None:
        """A buffer of `size` bytes that `track` was given to reuse and that has been sent, or
        None."""
        with self._cond:
            spare = self._spare.get(size)
            return spare.pop() if spare else None

    def track(self, dst: int, sent: list[tuple[Any, torch.Tensor, bool]]) -> None:
        """Keep sends that the caller posted to `dst`, as (work, its tensor, whether the tensor
        is a uint8 buffer to hand out by `spare` once sent), until gloo completes them: one
        wake-up of the thread for them all."""
        if not sent:
            return
        with self._cond:
            self._queue.extend((work, tensor, dst, reuse) for work, tensor, reuse in sent)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="distsgd-outbox",
                                                daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                work, payload, dst, reuse = self._queue[0]
            error = None
            try:
                work.wait(FOREVER)
            except RuntimeError as e:
                error = first_line(e)
            with self._cond:
                self._queue.popleft()
                if error is not None:
                    self._failures.append((dst, error))
                elif reuse:
                    self._spare.setdefault(payload.numel(), []).append(payload)
                self._cond.notify_all()

    def pending_dsts(self) -> set[int]:
        with self._cond:
            return {dst for _, _, dst, _ in self._queue}

    def take_failures(self) -> list[tuple[int, str]]:
        with self._cond:
            failures, self._failures = self._failures, []
            return failures

    def wait_empty(self, seconds: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue, seconds)

    def stop(self) -> None:
        """Let the thread end once its queue is empty."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
