"""TorchComm: the `Comm` protocol over torch.distributed with gloo (CPU tensors).

The semantics are those of `distsgd.comm.base`; this module maps them onto gloo, whose behaviour
shapes the design (measured on torch 2.13):

- gloo's point-to-point is a rendezvous: an ``isend`` completes only once the receiver posts a
  matching receive of the right size (a larger buffer is silently part-filled, a smaller one
  aborts the process), and a process that exits with a send in flight loses the message.
- a gloo p2p work learns it completed only inside ``wait()`` (``is_completed()`` stays False),
  and a ``wait`` that times out closes the connection ("Application timeout caused pair
  closure"); an any-source recv that times out closes every connection.

So TorchComm runs a mailbox: each message is a fixed header (magic number, kind, dtype, shape)
followed by its payload as raw bytes, and a thread (`_Mailbox`) receives every message as soon as
it is sent, from any sender, into a local inbox. `recv` and `poll` read that inbox: a recv timeout
is a plain wait that leaves the connections intact, a layout mismatch is a ValueError (a
`ProtocolError`) as in the simulator, and sends complete
at once. Another thread (`_Outbox`) waits for each send to complete and frees its payload.
`close` is collective: every rank sends each peer a last "goodbye" header and waits for theirs,
so no message is lost and no thread is left blocked inside gloo (one that wakes during
interpreter shutdown aborts the process).

Hostile input: nothing received is unpickled. Every header is checked on arrival (magic number,
kind, dtype code, dimensions, a size limit) before a byte of payload is allocated, and a bad one
is a `ProtocolError` naming the sender; a payload whose dtype or shape differs from the receiver's
buffer is one too. After a rejected header the stream from that rank cannot be trusted, so the
communicator refuses further work.

Failures: a collective that times out leaves gloo's own operation running, so after its
`CommTimeout` the communicator refuses further work; a recv timeout does not. A peer that dies
fails the operations that were under way with it (`PeerLost`), but gloo's any-source receive does
not notice: a recv waiting on a dead peer ends with its timeout, or earlier when the launcher (or
torchrun) ends the run. In a run that carries on after a death (``--on-failure continue``), the
launcher tells each survivor (`mark_dead`); from then on a send to the dead rank, a recv from it
and the next any-source recv raise `PeerDied`, so the algorithm can route around it, and `close`
no longer waits for its goodbye. Gloo refuses an isend to a closed connection at once; in that
mode such a refusal, or a lost send, also marks the peer dead.

Example, on every rank of an initialised gloo default group::

    comm = TorchComm(timeout=60.0)
    if comm.rank == 0:
        comm.send(torch.ones(3), dst=1)
    elif comm.rank == 1:
        comm.recv(buf := torch.empty(3), src=0)
    comm.close()
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distsgd.comm.base import (
    ByteCounter,
    Counted,
    Group,
    nbytes,
    ring_allreduce_bytes,
    tree_broadcast_children,
)
from distsgd.errors import (
    CommTimeout,
    PeerDied,
    ProtocolError,
    UsageError,
    WorkerFailure,
    check_range,
)

# An explicit wait this long never times out in practice: gloo would otherwise apply the group's
# timeout to a send whose receiver is merely slow, and a timed-out wait closes the connection.
_FOREVER = timedelta(days=7)
_HEADER_TAG, _PAYLOAD_TAG = 7101, 7102  # gloo tags of distsgd's messages
_MAGIC = 0x6473_6764_0001  # "dsgd", wire version 1: anything else is not our message
_DATA, _GOODBYE, _REPORT = 0, 1, 2  # _REPORT: evaluation reports, a channel of their own
_MAX_DIMS = 8
# magic, kind, dtype code, number of dimensions, sequence number (per sender and receiver), the
# shape, then the magic again: gloo part-fills a larger receive buffer without saying so, and the
# trailer (zeroed before each receive) shows that a header arrived whole.
_HEADER_LEN = 6 + _MAX_DIMS
_SEQ = 4
# A header may not make this rank allocate more than this for one payload (a model of 500 M
# float32 parameters); a larger claim is hostile or corrupt.
MAX_MESSAGE_BYTES = 2**31
# How long a receive that failed when a peer's connection reset waits for the launcher to declare
# that peer dead (it notices a dead process at once) before the failure ends the run.
_DEATH_GRACE = 10.0
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)


# Plain gloo, or torch's multi-backend group of a GPU run (`distsgd.launch.init_process_group`
# with device cuda): CPU tensors, hence the mailbox, on gloo; CUDA tensors' collectives on NCCL.
GLOO_BACKENDS = ("gloo", "cpu:gloo,cuda:nccl")


class PeerLost(WorkerFailure):
    """A peer's connection closed: it crashed, or its process ended without `close`.

    Usually the consequence of another worker's failure; the launcher reports that one instead.
    """


class TorchComm(Counted):
    """The `Comm` of one process of an initialised gloo default process group.

    `timeout` (seconds, > 0) is the default of every blocking verb. Initialise the process group
    with the same timeout (`distsgd.launch.init_process_group` does): gloo applies the group's
    timeout inside every collective, so a collective waits at most that long, and a per-call
    timeout can only shorten it (a recv may wait longer). Use one TorchComm per process, from
    one thread, and end with `close` on every rank. `carry_on` (``--on-failure continue``):
    a peer whose connection closes is taken for dead (`PeerDied`) rather than ending the run.
    """

    def __init__(self, timeout: float = 300.0, *, carry_on: bool = False) -> None:
        check_range("timeout", timeout, 0.0, low_open=True)
        if not dist.is_available() or not dist.is_initialized():
            raise UsageError("TorchComm needs an initialised default process group: call "
                             "distsgd.launch.init_process_group (or use distsgd.launch.launch)")
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
        # torchrun launcher (`distsgd.launch.from_torchrun_env`) says otherwise.
        self.nodes: tuple[int, ...] = (0,) * self._world_size
        self._exposed: dict[str, Callable[[], Any]] = {}
        self._outbox = _Outbox()
        self._mailbox = _Mailbox(self._rank, self._world_size - 1, carry_on)
        self._broken: str | None = None
        self._closed = False
        self._carry_on = carry_on
        self._sequence = [0] * self._world_size  # the next message's number, per receiver
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        # A process that ends without `close` still has the mailbox thread blocked in gloo; if it
        # wakes while the interpreter shuts down, the process aborts. Destroying the group first,
        # while Python still runs, avoids that.
        if not self._closed and dist.is_initialized():
            dist.destroy_process_group()

    @classmethod
    def init(cls, rank: int, world_size: int, rendezvous: str,
             timeout: float = 300.0) -> TorchComm:
        """Initialise gloo (``rendezvous``: ``file://...``, ``tcp://host:port``, ``env://``)."""
        from distsgd.launch import init_process_group  # launch imports this module

        init_process_group(rank, world_size, rendezvous, timeout)
        return cls(timeout)

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

    # ---------------------------------------------------------------------- counting

    # ------------------------------------------------------------------ point to point
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._send(_DATA, tensor, dst)
        self._counter.add("send", nbytes(tensor))

    def recv(self, out: torch.Tensor, src: int | None = None, timeout: float | None = None) -> int:
        return self._recv(_DATA, out, src, timeout)

    def poll(self, out: torch.Tensor, src: int | None = None) -> int | None:
        self._check_usable("poll")
        if src is not None:
            self._check_peer(src, "src")
        message = self._mailbox.take(_DATA, src, None)
        return None if message is None else self._deliver(message, out)

    def send_report(self, tensor: torch.Tensor, dst: int) -> None:
        """Send on the reports channel (uncounted): evaluation reports never mix with the
        algorithm's messages, whatever order they arrive in."""
        self._send(_REPORT, tensor, dst)

    def recv_report(self, out: torch.Tensor, src: int, timeout: float | None = None) -> int:
        """Receive from `src` on the reports channel (see `send_report`)."""
        return self._recv(_REPORT, out, src, timeout)

    # ------------------------------------------------------------------ deaths
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
        payload = _cpu_copy(tensor)
        self._post(_header(kind, payload), payload, dst)

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
            raise CommTimeout(f"rank {self._rank}: recv from {where} timed out after "
                              f"{seconds:g} s (the sender is slow, stuck or dead)")
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

    def _post(self, header: torch.Tensor, payload: torch.Tensor | None, dst: int) -> None:
        header[_SEQ] = self._sequence[dst]
        try:
            self._outbox.put(dist.isend(header, dst, tag=_HEADER_TAG), header, dst)
            self._sequence[dst] += 1
            if payload is not None and payload.numel():
                raw = payload.reshape(-1).view(torch.uint8)
                self._outbox.put(dist.isend(raw, dst, tag=_PAYLOAD_TAG), payload, dst)
        except RuntimeError as e:
            failure = self._failure("send", dst, self._timeout, e)
            if isinstance(failure, PeerLost) and self._carry_on:
                self._mailbox.mark_dead(dst)  # gloo saw its connection close: it died
                self._raise_if_dead(dst, "send to")
            raise failure from e

    # -------------------------------------------------------------------- collectives
    def all_reduce_(self, tensor: torch.Tensor, group: Group | None = None,
                    timeout: float | None = None) -> torch.Tensor:
        ranks, handle = self._group(group, "all_reduce")
        buf = tensor if _direct(tensor) else _cpu_copy(tensor)
        self._run("all_reduce", timeout, lambda: dist.all_reduce(
            buf, op=dist.ReduceOp.SUM, group=handle, async_op=True))
        if buf is not tensor:
            tensor.copy_(buf)
        self._counter.add("all_reduce", ring_allreduce_bytes(nbytes(tensor), len(ranks)))
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int, group: Group | None = None,
                   timeout: float | None = None) -> torch.Tensor:
        ranks, handle = self._group(group, "broadcast")
        if src not in ranks:
            raise ValueError(f"broadcast src={src} is not a member of group {list(ranks)}")
        buf = tensor if _direct(tensor) else _cpu_copy(tensor)
        self._run("broadcast", timeout, lambda: dist.broadcast(
            buf, src=src, group=handle, async_op=True))
        if buf is not tensor:
            tensor.copy_(buf)
        n = len(ranks)
        position = (ranks.index(self._rank) - ranks.index(src)) % n
        self._counter.add("broadcast", nbytes(tensor) * tree_broadcast_children(position, n))
        return tensor

    def barrier(self, group: Group | None = None, timeout: float | None = None) -> None:
        _, handle = self._group(group, "barrier")
        self._run("barrier", timeout, lambda: dist.barrier(group=handle, async_op=True))

    def new_group(self, ranks: list[int] | tuple[int, ...]) -> Group:
        """A group for collectives. Collective: EVERY rank calls it with the same ranks, in the
        same order, members or not (torch.distributed requires it)."""
        self._check_usable("new_group")
        ranks = tuple(ranks)
        if len(set(ranks)) != len(ranks) or any(not 0 <= r < self._world_size for r in ranks):
            raise ValueError(f"new_group({list(ranks)}): ranks must be distinct members of "
                             f"0..{self._world_size - 1}")
        try:
            handle = dist.new_group(list(ranks), timeout=timedelta(seconds=self._timeout))
        except RuntimeError as e:
            raise self._failure("new_group", None, self._timeout, e) from e
        return Group(ranks, handle)

    # ----------------------------------------------------------------------- shutdown
    def close(self, timeout: float | None = None) -> None:
        """End this rank's communication. Collective: every rank calls it once, at the end.

        Tells every peer that this rank sends no more, then waits until every peer has said the
        same and every message this rank sent has been taken: up to `timeout` seconds (None: the
        communicator's default; ``math.inf``: no limit, which the launcher uses since it ends the
        run if a rank dies), so the ranks must finish within `timeout` of each other. Messages
        this rank never received are dropped (`discarded`). It does not destroy the process group
        (`distsgd.launch.shutdown` does).
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
                    self._post(_header(_GOODBYE, None), None, peer)
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

    def _group(self, group: Group | None, verb: str) -> tuple[tuple[int, ...], Any]:
        self._check_usable(verb)
        ranks = (group or self._everyone).ranks
        if self._rank not in ranks:
            raise ValueError(f"rank {self._rank} called {verb} on group {list(ranks)} it is not in")
        handle = None if group is None else group.handle
        if handle is None and sorted(ranks) != list(self._everyone.ranks):
            raise ValueError(f"group {list(ranks)} has no process group: create it with this "
                             "communicator's new_group")
        return ranks, handle

    def _run(self, verb: str, timeout: float | None, start: Callable[[], Any]) -> None:
        """Start a collective and wait for it, translating gloo's errors."""
        seconds = self._timeout if timeout is None else min(timeout, self._timeout)
        check_range("timeout", seconds, 0.0, low_open=True)
        try:
            if start().wait(timedelta(seconds=seconds)) is False:
                raise RuntimeError("Operation timed out!")
        except RuntimeError as e:
            raise self._failure(verb, None, seconds, e) from e

    def _failure(self, verb: str, peer: int | None, seconds: float,
                 error: RuntimeError) -> WorkerFailure | CommTimeout:
        text = _first_line(error)
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


def _direct(tensor: torch.Tensor) -> bool:
    """Whether the group's backend can read and write `tensor` in place (else a staging copy
    on the CPU is used): gloo a CPU tensor, NCCL a CUDA one where the group has it."""
    if not tensor.is_contiguous():
        return False
    return tensor.device.type == "cpu" or (
        tensor.device.type == "cuda" and str(dist.get_backend()) == GLOO_BACKENDS[1])


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor.detach())


def _started(work: dist.Work | None) -> dist.Work:
    if work is None:  # torch returns None to a rank outside the group; ours holds every rank
        raise RuntimeError("torch.distributed started no operation")
    return work


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


def _header(kind: int, payload: torch.Tensor | None) -> torch.Tensor:
    """magic, kind, dtype index, number of dimensions, then the padded shape (int64)."""
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    header[0], header[1], header[-1] = _MAGIC, kind, _MAGIC
    if payload is not None:
        if payload.dtype not in _DTYPES or payload.dim() > _MAX_DIMS:
            raise UsageError(f"send: a {payload.dtype} tensor of {payload.dim()} dimensions "
                             f"cannot be sent; supported: up to {_MAX_DIMS} dimensions of "
                             f"{', '.join(str(d) for d in _DTYPES)}")
        header[2], header[3] = _DTYPES.index(payload.dtype), payload.dim()
        header[5:5 + payload.dim()] = torch.tensor(payload.shape, dtype=torch.int64)
    return header


def parse_header(values: list[int], limit: int = MAX_MESSAGE_BYTES,
                 ) -> tuple[int, torch.dtype, list[int]]:
    """(kind, dtype, shape) of a received header, or ValueError saying what is wrong with it.

    Checked before anything is allocated: a header is the only thing a sender controls.
    """
    magic, kind, code, ndim, _, *dims, trailer = values
    if magic != _MAGIC:
        raise ValueError(f"bad magic number {magic:#x} (expected {_MAGIC:#x}: not a distsgd "
                         "message, or another wire version)")
    if trailer != _MAGIC:
        raise ValueError(f"a truncated header of {len(values)} int64 (its trailer is "
                         f"{trailer:#x}, not {_MAGIC:#x})")
    if kind == _GOODBYE:
        return kind, torch.uint8, [0]
    if kind not in (_DATA, _REPORT):
        raise ValueError(f"unknown message kind {kind} (valid: {_DATA}, {_GOODBYE}, {_REPORT})")
    if not 0 <= code < len(_DTYPES):
        raise ValueError(f"unknown dtype code {code} (valid: 0..{len(_DTYPES) - 1})")
    if not 0 <= ndim <= _MAX_DIMS or any(d < 0 for d in dims) or any(dims[ndim:]):
        raise ValueError(f"bad shape: {ndim} dimensions {dims} (up to {_MAX_DIMS} sizes >= 0)")
    size = _DTYPES[code].itemsize
    for d in dims[:ndim]:  # multiply with a cap, so a hostile shape cannot overflow int64
        size = min(size * d, limit + 1)
    if size > limit:
        raise ValueError(f"a payload of shape {dims[:ndim]} and dtype {_DTYPES[code]} exceeds "
                         f"the limit of {limit} bytes")
    return kind, _DTYPES[code], dims[:ndim]


class _Mailbox:
    """Receives every message addressed to this rank, in arrival order, on a daemon thread."""

    def __init__(self, rank: int, peers: int, carry_on: bool) -> None:
        self._rank, self._carry_on = rank, carry_on
        # (sender, kind, payload): data and reports wait side by side, taken by kind
        self._inbox: collections.deque[tuple[int, int, torch.Tensor]] = collections.deque()
        self._open = peers  # peers that have not said goodbye (or died)
        self._closed: set[int] = set()
        self._expected: collections.Counter[int] = collections.Counter()  # next number per sender
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
        header = torch.empty(_HEADER_LEN, dtype=torch.int64)
        try:
            while self._open:
                header.zero_()  # a short header must not inherit the last one's trailer
                work = _started(dist.irecv(header, None, tag=_HEADER_TAG))
                try:
                    work.wait(_FOREVER)
                except RuntimeError:
                    # A peer that dies mid-message resets its connection under the any-source
                    # receive; with carry_on, the launcher declaring a death excuses it.
                    if self._carry_on and self._excused():
                        continue
                    raise
                src = work._source_rank()
                try:
                    kind, dtype, shape = parse_header(header.tolist())
                except ValueError as e:
                    with self._cond:
                        self.rejected = (f"rank {self._rank} rejected a message from rank {src}: "
                                         f"{e}")
                        self._cond.notify_all()
                    return  # what follows from that rank cannot be trusted
                if header[_SEQ] != self._expected[src]:  # never a silent misread of what follows
                    with self._cond:
                        self.rejected = (f"rank {self._rank} rejected a message from rank {src}: "
                                         f"it is number {int(header[_SEQ])}, not "
                                         f"{self._expected[src]}: a message was lost")
                        self._cond.notify_all()
                    return
                self._expected[src] += 1
                if kind == _GOODBYE:
                    self._close(src)
                    continue
                raw = torch.empty(torch.Size(shape).numel() * dtype.itemsize, dtype=torch.uint8)
                if raw.numel() and not self._receive_payload(raw, src):
                    continue
                with self._cond:
                    self._inbox.append((src, kind, raw.view(dtype).reshape(shape)))
                    self._cond.notify_all()
        except RuntimeError as e:
            with self._cond:
                self.failure = _first_line(e)
                self._cond.notify_all()

    def _excused(self) -> bool:
        """Whether a failed receive is explained by a death declared within `_DEATH_GRACE`
        seconds of it (a few failures per death at most, so a broken group still fails)."""
        failed = time.monotonic()
        with self._cond:
            self._excuses += 1
            if self._excuses > 4 * (len(self._dead) + 1):
                return False
            return self._cond.wait_for(
                lambda: abs(self._last_death - failed) <= _DEATH_GRACE, _DEATH_GRACE)

    def _receive_payload(self, raw: torch.Tensor, src: int) -> bool:
        try:
            _started(dist.irecv(raw, src, tag=_PAYLOAD_TAG)).wait(_FOREVER)
            return True
        except RuntimeError:
            if not self._carry_on:
                raise
            self.mark_dead(src)  # it died between header and payload: drop the half message
            return False

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


class _Outbox:
    """Sends in flight: one daemon thread waits for each in order, then frees its payload.

    gloo offers no way to poll a p2p send without risking its connection (see the module
    docstring), so a thread blocks in ``wait`` instead; failures are kept for the owner.
    """

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[Any, torch.Tensor, int]] = collections.deque()
        self._failures: list[tuple[int, str]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def put(self, work: Any, payload: torch.Tensor, dst: int) -> None:
        with self._cond:
            self._queue.append((work, payload, dst))
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
                work, _, dst = self._queue[0]
            error = None
            try:
                work.wait(_FOREVER)
            except RuntimeError as e:
                error = _first_line(e)
            with self._cond:
                self._queue.popleft()
                if error is not None:
                    self._failures.append((dst, error))
                self._cond.notify_all()

    def pending_dsts(self) -> set[int]:
        with self._cond:
            return {dst for _, _, dst in self._queue}

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
