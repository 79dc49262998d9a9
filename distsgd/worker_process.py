"""The inside of a worker process that `distsgd.launch.launch` started.

Each worker dies with the launching process, names itself in `ps`, joins the gloo group, runs
``fn(comm, *args)`` with a `TorchComm` whose `Supervisor` is its view of the launcher's shared
board (the steps it notes, the deaths the launcher declares), and pipes its result, or a
description of its failure, back to the launcher. `Spec`, `Board` and `Failure` are what the
launcher and its workers share.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distsgd.comm.base import set_current
from distsgd.comm.torch import PeerLost, TorchComm
from distsgd.comm.torch.group import init_process_group, shutdown
from distsgd.errors import CommTimeout, DivergenceError, PeerDied, UsageError
from distsgd.forkserver import Inherited

_WATCH_PERIOD = 0.05  # seconds between a survivor's looks at the board for deaths
StepHook = Callable[[int, int], None]  # (rank, step), in the worker after each noted step


@dataclass(frozen=True)
class Spec:
    """What every worker process needs (pickled into it by its start method)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    world_size: int
    rendezvous: str
    comm_timeout: float
    deadline: float | None  # time.time() by which the run must end
    parent_pid: int
    carry_on: bool = False  # on_failure == "continue"
    step_hook: StepHook | None = None  # fault injection (`distsgd.launch._step_hook`)
    device: str = "cpu"  # cuda: each process its own GPU, NCCL for collectives
    inherited: Inherited | None = None  # forked by the forkserver: the launch's env and streams


class Board:
    """Shared memory between the launcher and its workers, no pickling and no messages: each
    worker writes the last step it completed, the launcher writes which ranks died."""

    def __init__(self, ctx: Any, world_size: int) -> None:
        self.progress = ctx.RawArray("q", [-1] * world_size)  # -1: no step reported yet
        self.dead = ctx.RawArray("b", world_size)
        self.died_at = ctx.RawArray("d", world_size)  # time.time() the launcher saw it die

    def last_step(self, rank: int) -> int | None:
        step = int(self.progress[rank])
        return None if step < 0 else step


class _WorkerBoard:
    """This worker's view of the board: the `Supervisor` of its `TorchComm`."""

    def __init__(self, board: Board, rank: int, step_hook: StepHook | None) -> None:
        self.board, self.rank, self.step_hook = board, rank, step_hook

    def note_step(self, step: int) -> None:
        self.board.progress[self.rank] = step
        if self.step_hook is not None:
            self.step_hook(self.rank, step)

    def deaths(self) -> dict[int, tuple[int | None, float]]:
        board = self.board
        return {r: (board.last_step(r), board.died_at[r]) for r in range(len(board.dead))
                if board.dead[r]}


@dataclass(frozen=True)
class Failure:
    """A worker's failure; lower `priority` is more likely the cause of the others."""

    priority: int  # 0: raised or died; 1: timed out; 2: lost a peer
    rank: int
    message: str
    usage: bool = False
    remote_traceback: str = ""



def worker_main(rank: int, spec: Spec, conn: mp.connection.Connection, board: Board) -> None:
    _die_with_parent(spec.parent_pid)
    if spec.inherited is not None:
        spec.inherited.apply()  # before anything reads the environment
    _name_process(f"distsgd-rank{rank}")
    torch.set_num_threads(1)
    comm: TorchComm | None = None
    try:
        init_process_group(rank, spec.world_size, spec.rendezvous, spec.comm_timeout,
                           device=spec.device)
        comm = TorchComm(spec.comm_timeout, carry_on=spec.carry_on,
                         supervisor=_WorkerBoard(board, rank, spec.step_hook))
        if spec.carry_on:
            _watch_deaths(comm, board)
        set_current(comm)
        value = spec.fn(comm, *spec.args)
        # close waits for the slowest rank: only the run's deadline bounds it (the parent ends
        # the run if a worker dies).
        comm.close(math.inf if spec.deadline is None else max(spec.deadline - time.time(), 1e-3))
        report: tuple[str, Any] = ("ok", value)
    except BaseException as e:  # reported to the parent
        report = ("error", _describe(rank, e))
    finally:
        set_current(None)
    _report(rank, conn, report)
    conn.close()
    if report[0] != "ok":
        # Sends may still be in flight: a thread blocked in gloo that wakes during interpreter
        # shutdown aborts the process, and the parent is ending the run anyway.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    shutdown(None)  # the communicator is closed: destroy the process group


def _watch_deaths(comm: TorchComm, board: Board) -> None:
    """Tell `comm` of every death the launcher declares (a daemon thread; it reads only)."""

    def watch() -> None:
        told: set[int] = set()
        while True:
            for r in range(len(board.dead)):
                if board.dead[r] and r not in told:
                    told.add(r)
                    comm.mark_dead(r)
            time.sleep(_WATCH_PERIOD)

    threading.Thread(target=watch, name="distsgd-death-watch", daemon=True).start()


def _report(rank: int, conn: mp.connection.Connection, report: tuple[str, Any]) -> None:
    try:
        # Plain pickle, not the connection's: torch's reducer would share tensors through file
        # descriptors that the parent fetches from this process, which may have exited by then.
        conn.send_bytes(pickle.dumps(report))
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        failure = Failure(0, rank, f"worker {rank} failed: its result cannot be pickled: {e!r}")
        conn.send_bytes(pickle.dumps(("error", failure)))


def _describe(rank: int, error: BaseException) -> Failure:
    line = "".join(traceback.format_exception_only(type(error), error)).strip()
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    if isinstance(error, UsageError):
        return Failure(0, rank, str(error), usage=True, remote_traceback=text)
    consequence = isinstance(error, (PeerLost, PeerDied))  # of another worker's failure
    priority = 2 if consequence else 1 if isinstance(error, CommTimeout) else 0
    if isinstance(error, DivergenceError):  # its message already names the worker and step
        return Failure(priority, rank, str(error), remote_traceback=text)
    return Failure(priority, rank, f"worker {rank} failed: {line}", remote_traceback=text)


def _name_process(name: str) -> None:
    """Show the rank in `ps` and /proc/PID/comm (Linux), so an operator can tell workers apart."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15])  # PR_SET_NAME


def _die_with_parent(launcher_pid: int) -> None:
    """Make this process die when the launching process dies, however it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: when the parent dies
            if os.getppid() == launcher_pid:  # spawned: the parent is the launcher
                return
            # Forked by the forkserver, this process's parent: the server exits when the
            # launcher does (then the signal comes), but watch the launcher itself as well.
            _watch_launcher(launcher_pid)
            return

    def watch() -> None:
        while os.getppid() == launcher_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="distsgd-parent-watch", daemon=True).start()


def _watch_launcher(launcher_pid: int) -> None:
    """Exit when the process `launcher_pid` ends (Linux: a pidfd turns readable then)."""
    try:
        pidfd = os.pidfd_open(launcher_pid)
    except ProcessLookupError:  # it ended before this process started
        os._exit(1)
    except (OSError, AttributeError):  # a kernel before 5.3: poll instead
        pidfd = None

    def watch() -> None:
        while True:
            if pidfd is not None:
                if select.select([pidfd], [], [], 60.0)[0]:
                    os._exit(1)
                continue
            try:
                os.kill(launcher_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(0.5)

    threading.Thread(target=watch, name="distsgd-launcher-watch", daemon=True).start()
