"""TorchComm: the `Comm` protocol over torch.distributed with gloo (CPU tensors).

The semantics are those of `distsgd.comm.base`. Point-to-point messages travel through the
transport of `distsgd.comm.torch.mailbox` in the format of `distsgd.comm.torch.wire`: a recv
reads the mailbox's inbox, so a recv timeout is a plain wait that leaves the connections intact,
a layout mismatch is a `ProtocolError` as in the simulator, and sends complete at once.
`exchange` posts its receives ahead instead (`distsgd.comm.torch.exchange`): no mailbox, no
header round trip; after its timeout the communicator refuses further work. The collectives
are in `distsgd.comm.torch.collectives`. `close` is collective: every rank sends each peer a
last "goodbye" header and waits for theirs, so no message is lost and no thread is left blocked
inside gloo (one that wakes during interpreter shutdown aborts the process).

Hostile input: a header the mailbox rejects, or a payload whose dtype or shape differs from the
receiver's buffer, is a `ProtocolError` naming the sender. After a rejected header the stream
from that rank cannot be trusted, so the communicator refuses further work.

Failures: a collective that times out leaves gloo's own operation running, so after its
`CommTimeout` the communicator refuses further work; a recv timeout does not. A peer that dies
fails the operations that were under way with it (`PeerLost`), but gloo's any-source receive does
not notice: a recv waiting on a dead peer ends with its timeout, or earlier when the launcher (or
torchrun) ends the run. In a run that carries on after a death (``--on-failure continue``), the
launcher tells each survivor (`mark_dead`); from then on a send to the dead rank, a recv or a poll
from it (once what it sent before dying has been taken) and the next any-source recv raise
`PeerDied`, so the algorithm can route around it, and `close` no longer waits for its goodbye. An
any-source poll never raises: it takes what has come, and the next any-source recv announces the
death. Gloo refuses an isend to a closed connection at once; in that mode such a refusal, or a lost
send, also marks the peer dead.

Supervision: a process the local launcher started has a `Supervisor` (its view of the launcher's
shared board, `distsgd.worker_process`), which `note_step` tells of each step and `deaths` asks;
without one (torchrun) `note_step` does nothing and `deaths` is empty.

Example, on every rank of a gloo group (`distsgd.comm.torch.group.init_process_group`)::

    comm = TorchComm(timeout=60.0)
    if comm.rank == 0:
        comm.send(torch.ones(3), dst=1)
    elif comm.rank == 1:
        comm.recv(buf := torch.empty(3), src=0)
    comm.close()
"""

from __future__ import annotations

import atexit
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from distsgd.comm.base import (
    ByteCounter,
    Counted,
    Group,
    nbytes,
)
from distsgd.comm.torch import wire
from distsgd.comm.torch.collectives import GLOO_BACKENDS, Collectives, cpu_copy
from distsgd.comm.torch.exchange import Receiver, Sender, Started, post_all
from distsgd.comm.torch.mailbox import DEATH_GRACE, Mailbox, Outbox, PeerLost, first_line
from distsgd.errors import (
    CommTimeout,
    PeerDied,
    ProtocolError,
    UsageError,
    WorkerFailure,
    check_range,
)


class Supervisor(Protocol):
    """What watches this process from outside (the local launcher's shared board)."""

    def note_step(self, step: int) -> None:
        """This rank completed training step `step`."""
        ...

    def deaths(self) -> dict[int, tuple[int | None, float]]:
        """{rank: (its last noted step or None, time.time() it was declared dead)}."""
        ...


class TorchComm(Counted, Collectives):
    """The `Comm` of one process of an initialised gloo default process group.

    `timeout` (seconds, > 0) is the default of every blocking verb. Initialise the process group
    with the same timeout (`group.init_process_group` does): gloo applies the group's timeout
    inside every collective, so a collective waits at most that long, and a per-call timeout
    can only shorten it (a recv may wait longer). Use one TorchComm per process, from
    one thread, and end with `close` on every rank. `carry_on` (``--on-failure continue``):
    a peer whose connection closes is taken for dead (`PeerDied`) rather than ending the run.
    `supervisor`: what `note_step` and `deaths` report to and read from (the launcher's).
    """

    def __init__(self, timeout: float = 300.0, *, carry_on: bool = False,
                 supervisor: Supervisor | None = None) -> None:
        check_range("timeout", timeout, 0.0, low_open=True)
        if not dist.is_available() or not dist.is_initialized():
            raise UsageError("TorchComm needs an initialised default process group: call "
                             "distsgd.comm.torch.group.init_process_group (or use "
                             "distsgd.launch.launch)")
        if dist.get_backend() not in GLOO_BACKENDS:
            raise UsageError(f"TorchComm needs a gloo process group, not {dist.get_backend()!r}: "
                             "its mailbox relies on gloo's receive from any rank; valid: "
                             f"{', '.join(GLOO_BACKENDS)}")
        self._rank = dist.get_rank()
        self._world_size = dist.get_world_size()
        self._timeout = float(timeout)
        self._everyone = Group(tuple(range(self._world_size)))
        self._counter = ByteCounter()
        # The machine of each global rank (torchrun's GROUP_RANK); one machine unless the
        # torchrun launcher (`group.from_torchrun_env`) says otherwise.
        self.nodes: tuple[int, ...] = (0,) * self._world_size
        self._exposed: dict[str, Callable[[], Any]] = {}
        self._outbox = Outbox(self._world_size)
        self._mailbox = Mailbox(self._rank, self._world_size - 1, carry_on)
        self._receiver = Receiver(self._rank, self._world_size, lambda src: carry_on and (
            self._mailbox.await_death(src, DEATH_GRACE)))
        self._sender = Sender(self._world_size, self._outbox)
        self._supervisor = supervisor
        self._broken: str | None = None
        self._closed = False
        self._carry_on = carry_on
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        # Without `close` the mailbox thread is still blocked in gloo; if it wakes during the
        # interpreter's shutdown the process aborts, so the group is destroyed while Python runs.
        if not self._closed and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------------ identity
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def discarded(self) -> int:
        """Messages sent to this rank that it never received (dropped by `close`)."""
        return self._mailbox.discarded

    def elapse(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"elapse({seconds}): time cannot run backwards")

    def now(self) -> float | None:
        return None

    def expose(self, key: str, fn: Callable[[], Any]) -> None:
        self._exposed[key] = fn

    def observe(self, rank: int, key: str) -> Any:
        """Only this rank's own state: processes share no memory (ask by message instead)."""
        fn = self._exposed.get(key) if rank == self._rank else None
        return None if fn is None else fn()

    # ------------------------------------------------------------------ point to point
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._send(wire.DATA, tensor, dst)
        self._counter.add("send", nbytes(tensor))

    def recv(self, out: torch.Tensor, src: int | None = None, timeout: float | None = None) -> int:
        return self._recv(wire.DATA, out, src, timeout)

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]],
                 recvs: Sequence[tuple[torch.Tensor, int]],
                 timeout: float | None = None) -> tuple[frozenset[int], frozenset[int]]:
        """Receives posted, then sends, then all waited for, sends too (`comm.torch.exchange`)."""
        self._check_usable("exchange")
        seconds = self._timeout if timeout is None else timeout
        check_range("timeout", seconds, 0.0, low_open=True)
        direct: list[tuple[int, Any]] = []
        posted, unsent, dead = self._post_exchange(sends, recvs, "exchange", seconds, direct)
        outcome = self._receiver.wait(posted, seconds, direct)
        error = outcome.error(self._rank, seconds)
        if error is not None:
            self._broken = "an exchange failed"  # receives may still be posted into the tensors
            raise error
        return unsent | outcome.unsent, dead | outcome.dead

    def exchange_start(self, sends: Sequence[tuple[torch.Tensor, int]],
                       recvs: Sequence[tuple[torch.Tensor, int]]) -> Started:
        """`exchange` that returns at once: each receive waited for on its sender's thread."""
        self._check_usable("exchange_start")
        posted, unsent, dead = self._post_exchange(sends, recvs, "exchange_start", self._timeout)
        return Started(self._receiver, posted, unsent, dead, self._rank, self._timeout,
                       lambda why: setattr(self, "_broken", why))

    def _post_exchange(self, sends: Sequence[tuple[torch.Tensor, int]],
                       recvs: Sequence[tuple[torch.Tensor, int]], verb: str, seconds: float,
                       direct: list[tuple[int, Any]] | None = None,
                       ) -> tuple[list[Any], frozenset[int], frozenset[int]]:
        def refused(error: RuntimeError) -> Exception:
            self._broken = "an exchange failed to start"
            return self._failure(verb, None, seconds, error)
        def send(tensor: torch.Tensor, dst: int) -> bool:
            with contextlib.suppress(PeerDied):  # False: it died, nothing was sent
                self._post(None, tensor, dst, direct)
                self._counter.add("send", nbytes(tensor))
                return True
            return False
        return post_all(self._receiver, send, sends, recvs, self._rank, self._world_size,
                        self.dead, refused)

    def poll(self, out: torch.Tensor, src: int | None = None) -> int | None:
        self._check_usable("poll")
        if src is not None:
            self._check_peer(src, "src")
        message = self._mailbox.take(wire.DATA, src, None)
        if message is None:
            if src is not None:  # nothing more can come from a dead sender: say so, as recv does
                self._raise_if_dead(src, "poll")
            return None
        return self._deliver(message, out)

    def send_report(self, tensor: torch.Tensor, dst: int) -> None:
        """Send on the reports channel (uncounted): evaluation reports never mix with the
        algorithm's messages, whatever order they arrive in."""
        self._send(wire.REPORT, tensor, dst)

    def recv_report(self, out: torch.Tensor, src: int, timeout: float | None = None) -> int:
        """Receive from `src` on the reports channel (see `send_report`)."""
        return self._recv(wire.REPORT, out, src, timeout)

    # ------------------------------------------------------------------ supervision
    def note_step(self, step: int) -> None:
        if self._supervisor is not None:
            self._supervisor.note_step(step)

    def deaths(self) -> dict[int, tuple[int | None, float]]:
        return {} if self._supervisor is None else self._supervisor.deaths()

    def mark_dead(self, rank: int) -> None:
        """Record that `rank` died and the run carries on without it (see the module notes)."""
        self._mailbox.mark_dead(rank)

    @property
    def dead(self) -> frozenset[int]:
        """The ranks known to have died."""
        return self._mailbox.dead_ranks()

    def _send(self, kind: int, tensor: torch.Tensor, dst: int) -> None:
        self._check_usable("send")
        self._check_peer(dst, "dst")
        self._raise_if_dead(dst, "send to")
        payload = cpu_copy(tensor)
        self._post(wire.header(kind, payload), payload, dst)

    def _recv(self, kind: int, out: torch.Tensor, src: int | None,
              timeout: float | None) -> int:
        self._check_usable("recv")
        if src is not None:
            self._check_peer(src, "src")
        seconds = self._timeout if timeout is None else timeout
        check_range("timeout", seconds, 0.0, low_open=True)
        message = self._mailbox.take(kind, src, seconds)
        if message is None:
            self._check_usable("recv")  # the mailbox failed: a peer was lost
            where = "any rank" if src is None else f"rank {src}"
            self._raise_if_dead(src, "recv from")
            if self._mailbox.has_closed(src):
                raise WorkerFailure(f"rank {self._rank}: recv from {where} can never complete: "
                                    f"{'every peer has' if src is None else where + ' has'} "
                                    "closed its communicator")
            stalled = [r for r in self._mailbox.stalled() if src in (None, r)]
            raise CommTimeout(f"rank {self._rank}: recv from {where} timed out after "
                              f"{seconds:g} s (the sender is slow, stuck or dead" + (
                                  f"; rank(s) {stalled} sent a header but not its payload)"
                                  if stalled else ")"))
        return self._deliver(message, out)

    def _raise_if_dead(self, peer: int | None, verb: str) -> None:
        """PeerDied for a dead `peer`, or (None: any rank) for a death not yet announced."""
        dead = self._mailbox.dead_to_announce() if peer is None else (
            peer if peer in self._mailbox.dead_ranks() else None)
        if dead is not None:
            raise PeerDied(f"rank {self._rank}: cannot {verb} rank {dead}: it died and the run "
                           "carries on without it", dead)

    def _deliver(self, message: tuple[int, torch.Tensor], out: torch.Tensor) -> int:
        sender, payload = message
        if payload.shape != out.shape or payload.dtype != out.dtype:
            raise ProtocolError(
                f"rank {self._rank} received a {payload.dtype} tensor of shape "
                f"{tuple(payload.shape)} from rank {sender} into a {out.dtype} buffer of shape "
                f"{tuple(out.shape)}; sender and receiver must agree on the message layout")
        out.copy_(payload)
        return sender

    def _post(self, header: torch.Tensor | None, payload: torch.Tensor | None, dst: int,
              direct: list[tuple[int, Any]] | None = None) -> None:
        """Post `header` and `payload`, or (header None) `payload` on exchange's channel."""
        try:
            if header is None:
                assert payload is not None
                self._sender.post(payload, dst, direct)
            else:
                self._outbox.post(header, payload, dst)
        except RuntimeError as e:
            failure = self._failure("send", dst, self._timeout, e)
            if isinstance(failure, PeerLost) and self._carry_on:
                self._mailbox.mark_dead(dst)  # gloo saw its connection close: it died
                self._raise_if_dead(dst, "send to")
            raise failure from e

    # ----------------------------------------------------------------------- shutdown
    def close(self, timeout: float | None = None) -> None:
        """End this rank's communication. Collective: every rank calls it once, at the end.

        Tells every peer that this rank sends no more, then waits until every peer has said the
        same and every message this rank sent has been taken: up to `timeout` seconds (None: the
        communicator's default; ``math.inf``: no limit, which the launcher uses since it ends the
        run if a rank dies), so the ranks must finish within `timeout` of each other. Messages
        this rank never received are dropped (`discarded`). It does not destroy the process group
        (`distsgd.comm.torch.group.shutdown` does).
        """
        if self._closed:
            return
        self._closed = True
        self._raise_lost_sends()
        if self._world_size == 1:
            return
        for peer in range(self._world_size):
            if peer != self._rank and peer not in self._mailbox.dead_ranks():
                with contextlib.suppress(PeerDied):  # it died meanwhile: nobody to tell
                    self._post(wire.header(wire.GOODBYE, None), None, peer)
        seconds = self._timeout if timeout is None else timeout
        check_range("timeout", seconds, 0.0, low_open=True)
        deadline = time.monotonic() + seconds
        while not self._mailbox.wait_all_closed(0.2):
            self._raise_lost_sends()
            if self._mailbox.rejected is not None:
                raise ProtocolError(self._mailbox.rejected)
            if self._mailbox.failure is not None:
                raise PeerLost(f"rank {self._rank}: close failed: a peer crashed or ended "
                               f"without closing its communicator (gloo: {self._mailbox.failure})")
            if time.monotonic() >= deadline:
                waiting = [r for r in range(self._world_size)
                           if r != self._rank and not self._mailbox.has_closed(r)]
                raise CommTimeout(f"rank {self._rank}: close timed out after {seconds:g} s "
                                  f"waiting for rank(s) {waiting} to close")
        if not self._outbox.wait_empty(self._timeout):
            raise CommTimeout(f"rank {self._rank}: close timed out after {self._timeout:g} s: "
                              f"rank(s) {sorted(self._outbox.pending_dsts())} did not take "
                              "this rank's messages")
        self._raise_lost_sends()
        self._mailbox.join()
        self._outbox.stop()

    # ------------------------------------------------------------------------ helpers
    def _check_peer(self, peer: int, what: str) -> None:
        if not 0 <= peer < self._world_size or peer == self._rank:
            raise ValueError(f"{what}={peer} is not another rank of a world of {self._world_size}")

    def _check_usable(self, verb: str) -> None:
        if self._closed:
            raise UsageError(f"rank {self._rank}: {verb} on a closed communicator")
        if self._broken is not None:
            raise CommTimeout(f"rank {self._rank}: {verb} refused: {self._broken} and gloo may "
                              "still be running it, so this communicator cannot be used again")
        if self._mailbox.rejected is not None:
            raise ProtocolError(self._mailbox.rejected)
        self._raise_lost_sends()
        failure = self._mailbox.failure
        if failure is not None:
            raise PeerLost(f"rank {self._rank}: receiving failed: a peer crashed or ended "
                           f"without closing its communicator (gloo: {failure})")

    def _raise_lost_sends(self) -> None:
        for dst, error in self._outbox.take_failures():
            if self._carry_on:  # the message died with its receiver: part of what it held
                self._mailbox.mark_dead(dst)
                continue
            raise PeerLost(f"rank {self._rank}: a message to rank {dst} was lost: rank {dst} "
                           f"crashed or ended without closing its communicator (gloo: {error})")

    def _failure(self, verb: str, peer: int | None, seconds: float,
                 error: RuntimeError) -> WorkerFailure | CommTimeout:
        text = first_line(error)
        where = "" if peer is None else f" to rank {peer}"
        if "timed out" in text.lower():
            self._broken = f"{verb} timed out"
            return CommTimeout(f"rank {self._rank}: {verb}{where} timed out after {seconds:g} s "
                               f"(a peer is slow, stuck or dead; gloo: {text})")
        if not any(s in text.lower() for s in ("closed", "reset", "broken pipe", "closure")):
            return WorkerFailure(f"rank {self._rank}: {verb}{where} failed: {text}")
        who = "a peer" if peer is None else f"rank {peer}"
        return PeerLost(f"rank {self._rank}: {verb}{where} failed: {who} crashed or ended "
                        f"without closing its communicator (gloo: {text})")
