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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distsgd.comm.torch import wire
from distsgd.comm.torch.mailbox import PeerLost, first_line, started
from distsgd.errors import CommTimeout, ProtocolError

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
