"""Worker processes for a grid's cells that never outlive the compare that started them.

`Pool(fn, jobs)` runs ``fn(item)`` in up to `jobs` spawned processes, each reused for cell after
cell (torch is imported once per process, not once per cell). Unlike a
`concurrent.futures.ProcessPoolExecutor`, whose workers go on running, or wait on their queue,
after their parent is killed:

- each worker dies with the parent process however it dies (PR_SET_PDEATHSIG on Linux, a thread
  watching the parent's pid elsewhere), SIGKILL included;
- leaving the pool on an exception (Ctrl-C, SIGTERM turned into one by the CLI) stops every
  worker at once: SIGTERM, which unwinds the cell's run (a real-process cell's launcher then
  ends its own workers), and SIGKILL after `TERM_GRACE` seconds;
- a worker that dies fails only the cell it ran (`Died`); the next cell gets a fresh process.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

from distsgd import launch

TERM_GRACE = 3.0  # seconds between SIGTERM and SIGKILL when the pool is stopped
_EXIT_GRACE = 5.0  # seconds an idle worker may take to exit once told to
_WATCH_PERIOD = 0.5  # seconds between looks at the parent's pid (where prctl is missing)
_NOTHING = object()  # no answer from a worker


@dataclass(frozen=True)
class Died:
    """The outcome of an item whose worker process died before answering."""

    reason: str  # e.g. "killed by signal SIGKILL"


class _Worker:
    def __init__(self, ctx: Any, fn: Callable[[Any], Any]) -> None:
        self.conn, child = ctx.Pipe()
        # spawn: a fork of a process that holds torch's thread pools can hang.
        self.process = ctx.Process(target=_serve, args=(child, fn, os.getpid()),
                                   name="distsgd-compare-worker")
        self.process.start()
        child.close()

    def stop(self) -> None:
        """Ask an idle worker to exit (it is waiting for its next item)."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)


class Pool:
    """Up to `jobs` processes running `fn` (a module-level function: it is pickled by name)."""

    def __init__(self, fn: Callable[[Any], Any], jobs: int) -> None:
        self.fn, self.jobs = fn, jobs
        self.ctx = mp.get_context("spawn")
        self.idle: list[_Worker] = []
        self.busy: dict[_Worker, Hashable] = {}

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close(now=kind is not None)

    @property
    def free(self) -> bool:
        return len(self.busy) < self.jobs

    def running(self) -> list[Hashable]:
        return list(self.busy.values())

    def submit(self, key: Hashable, item: Any) -> None:
        """Run ``fn(item)`` in an idle worker (or a new one); `wait` returns it under `key`."""
        worker = self.idle.pop() if self.idle else _Worker(self.ctx, self.fn)
        try:
            worker.conn.send(item)
        except (OSError, ValueError):  # it died while idle: a fresh one
            _end([worker])
            worker = _Worker(self.ctx, self.fn)
            worker.conn.send(item)
        self.busy[worker] = key

    def wait(self, timeout: float) -> list[tuple[Hashable, Any]]:
        """The (key, outcome) pairs finished within `timeout` seconds: `fn`'s result, or
        `Died` for a worker that died running it."""
        handles = [h for w in self.busy for h in (w.conn, w.process.sentinel)]
        ready = mp.connection.wait(handles, timeout) if handles else []
        done = []
        for worker, key in list(self.busy.items()):
            if worker.conn not in ready and worker.process.sentinel not in ready:
                continue
            del self.busy[worker]
            outcome: Any = _NOTHING
            with contextlib.suppress(EOFError, OSError):
                # A worker that answered and then died still answered: read before concluding.
                if worker.conn.poll(0.5):
                    outcome = worker.conn.recv()
            if outcome is not _NOTHING and worker.process.is_alive():
                self.idle.append(worker)
            else:
                worker.process.join(TERM_GRACE)  # it is exiting: let it say how
                _end([worker])
                worker.conn.close()
            if outcome is _NOTHING:
                outcome = Died(_exit_reason(worker.process.exitcode))
            done.append((key, outcome))
        return done

    def close(self, now: bool) -> None:
        """End every worker: idle ones are told to exit; with `now`, or for the busy ones, they
        are terminated (SIGTERM, then SIGKILL after `TERM_GRACE`)."""
        workers, busy = [*self.idle, *self.busy], list(self.busy)
        self.idle, self.busy = [], {}
        if not now:
            for worker in workers:
                worker.stop()
            end = time.monotonic() + _EXIT_GRACE
            for worker in workers:
                worker.process.join(max(0.0, end - time.monotonic()))
        _end(workers if now else busy + [w for w in workers if w.process.is_alive()])
        for worker in workers:
            worker.conn.close()


def _end(workers: list[_Worker]) -> None:
    """SIGTERM, then SIGKILL those still alive after `TERM_GRACE` seconds; reap every one."""
    launch.terminate([w.process for w in workers], TERM_GRACE)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with status {code}"


# ------------------------------------------------------------------- in the worker process
def _serve(conn: mp.connection.Connection, fn: Callable[[Any], Any], parent: int) -> None:
    _die_with_parent(parent)
    # SIGTERM (the pool stopping) unwinds the running cell, so that its own clean-up runs: a
    # real-process cell's launcher ends its workers and removes its rendezvous folder. Ctrl-C
    # on a terminal reaches every process of the group: the same, without a traceback each.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    import torch

    torch.set_num_threads(1)  # each cell is single-threaded: `jobs` processes use `jobs` cores
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if item is None:
            return
        outcome = fn(item)
        if _stopping:  # the signal was caught as the cell's failure: exit all the same
            return
        conn.send(outcome)


_stopping = False


def _stop(signum: int, frame: FrameType | None) -> None:
    global _stopping
    _stopping = True
    raise SystemExit(128 + signum)


def _die_with_parent(parent: int) -> None:
    """Make this process die when the compare process dies, however it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_WATCH_PERIOD)
        os._exit(1)

    threading.Thread(target=watch, name="distsgd-parent-watch", daemon=True).start()
