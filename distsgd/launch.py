"""Real processes on this machine: start N local gloo workers and supervise them.

`launch(fn, n)` runs ``fn(comm, *args)`` in n fresh processes (forked from a server that has
imported torch, or ``spawn``: `distsgd.forkserver`), each with a `TorchComm`
over a gloo group that meets through a file in a fresh temporary directory, and returns the n
results in rank order. It never leaves a process behind and never hangs past its deadline: the
first worker that raises or dies ends the run, the others are terminated (SIGTERM, then SIGKILL),
and the error names the worker and the last step it reported (`Comm.note_step`). Children also die
with the parent (PR_SET_PDEATHSIG on Linux, a watchdog thread elsewhere).

With ``on_failure="continue"`` a worker that dies without reporting (killed, crashed) does not end
the run unless its rank is `essential`: the launcher marks it dead on a shared board, a thread in
every survivor tells its communicator (`TorchComm.mark_dead`), `Comm.deaths` lists it, and the
dead rank's result is None. A worker that raises still ends the run. ``DISTSGD_KILL`` injects such
a death (`distsgd.testing.faults`).

    def work(comm, scale):                     # module level: it is pickled by reference
        t = torch.full((2,), float(comm.rank) * scale)
        return comm.all_reduce_(t).tolist()

    launch(work, 4, args=(1.0,))               # [[6.0, 6.0], [6.0, 6.0], ...]

Process-group set-up and torchrun's environment are in `distsgd.comm.torch.group`.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from distsgd.comm.torch.group import file_rendezvous
from distsgd.errors import UsageError, WorkerFailure, check_range
from distsgd.forkserver import Inherited, context, environ, start_method
from distsgd.worker_process import Board, Failure, Spec, StepHook, worker_main

# After a failure that is usually a consequence (a timeout, a lost peer), how long to wait for
# the worker that caused it to report, so that the error names the cause.
_CAUSE_GRACE = 2.0
_TERM_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
_EXIT_GRACE = 10.0  # seconds a worker that returned its result may take to exit
_START_LOCK = threading.Lock()  # launches from several threads set os.environ one at a time
ON_FAILURE = ("stop", "continue")


class _RemoteTraceback(Exception):
    """The traceback text of a worker process, chained to the error the parent raises."""

    def __str__(self) -> str:
        return str(self.args[0])


def launch(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *,
           timeout: float | None = None, comm_timeout: float = 300.0,
           env: Mapping[str, str] | None = None, on_failure: str = "stop",
           essential: Collection[int] = (), device: str = "cpu") -> list[Any]:
    """Run ``fn(comm, *args)`` in `world_size` processes; return their results in rank order.

    `fn`, `args` and the results must be picklable (`fn` a module-level function). `timeout` is
    the deadline of the whole run in seconds (None: none); `comm_timeout` the default timeout of
    every communication verb; `env` extra environment variables for the workers. Raises
    `WorkerFailure` naming the worker that raised or died and its last step (or `UsageError`,
    re-raised with its message, when that is what a worker raised). With `on_failure`
    "continue", a worker outside `essential` may die without ending the run (its result: None).
    `device` "cuda": each process its own GPU and NCCL for collectives
    (`distsgd.comm.torch.group.init_process_group`).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size={world_size!r} must be a positive integer")
    if timeout is not None:
        check_range("timeout", timeout, 0.0, low_open=True)
    check_range("comm_timeout", comm_timeout, 0.0, low_open=True)
    if on_failure not in ON_FAILURE:
        raise UsageError(f"unknown on_failure {on_failure!r}; valid choices: "
                         f"{', '.join(ON_FAILURE)}")
    step_hook = _step_hook({**os.environ, **(env or {})}, world_size)
    method = start_method(device)
    deadline = None if timeout is None else time.monotonic() + timeout
    procs: list[Any] = []
    conns: list[mp.connection.Connection] = []
    with file_rendezvous() as url:
        try:
            # Under the lock: the environment a spawned worker copies (or the forkserver, when
            # it starts) is this launch's alone.
            with _START_LOCK:
                extra = _worker_env(env)
                ctx = context(method, extra["OMP_NUM_THREADS"])
                board = Board(ctx, world_size)
                spec = Spec(fn, tuple(args), world_size, url, comm_timeout,
                            None if timeout is None else time.time() + timeout, os.getpid(),
                            on_failure == "continue", step_hook, device,
                            Inherited({**os.environ, **extra}) if method == "forkserver" else None)
                with environ(extra if method == "spawn" else {}):
                    for rank in range(world_size):
                        reader, writer = ctx.Pipe(duplex=False)
                        conns.append(reader)
                        proc = ctx.Process(target=worker_main, args=(rank, spec, writer, board),
                                           name=f"distsgd-worker-{rank}")
                        _start(proc, fn)
                        procs.append(proc)
                        writer.close()
            survivable = set() if on_failure == "stop" else set(range(world_size)) - set(essential)
            return _Supervisor(procs, conns, deadline, timeout, board, survivable).run()
        finally:
            _terminate(procs)
            for conn in conns:
                conn.close()


def _step_hook(env: Mapping[str, str], world_size: int) -> StepHook | None:
    """The per-step hook of fault injection that `env` asks for (``DISTSGD_KILL``), or None.

    Test infrastructure: it lives in `distsgd.testing.faults` (its docstring says why the
    launcher must still look), imported here only, and only when a run starts.
    """
    from distsgd.testing.faults import from_environment

    return from_environment(env, world_size)


def _start(proc: Any, fn: Callable[..., Any]) -> None:
    try:
        proc.start()
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise UsageError(f"launch: cannot send {getattr(fn, '__qualname__', fn)!r} or its args to "
                         f"a worker process ({e}); use a module-level function and picklable "
                         "arguments") from e


def _worker_env(env: Mapping[str, str] | None) -> dict[str, str]:
    extra: dict[str, str] = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
        extra["GLOO_SOCKET_IFNAME"] = "lo"  # local workers talk over loopback only
    extra.update(env or {})
    return extra


class _Supervisor:
    """Collects every worker's result; on the first failure, raises its most likely cause."""

    def __init__(self, procs: list[Any], conns: list[mp.connection.Connection],
                 deadline: float | None, timeout: float | None, board: Board,
                 survivable: set[int]) -> None:
        self.procs, self.deadline, self.timeout = procs, deadline, timeout
        self.board, self.survivable = board, survivable
        self.dead: set[int] = set()
        self.results: dict[int, Any] = {}
        self.failures: list[Failure] = []
        self.open_conns = dict(enumerate(conns))
        self.running = {r: p.sentinel for r, p in enumerate(procs)}
        self.grace_end = math.inf  # set by the first failure

    def run(self) -> list[Any]:
        n = len(self.procs)
        while len(self.results) + len(self.dead) < n:
            now = time.monotonic()
            deadline = math.inf if self.deadline is None else self.deadline
            self._check(now, late=now >= deadline)
            limit = min(deadline, self.grace_end)
            ready = mp.connection.wait([*self.open_conns.values(), *self.running.values()],
                                       None if limit == math.inf else max(limit - now, 0.0))
            self._collect(ready)
            if self.failures and self.grace_end == math.inf:
                self.grace_end = time.monotonic() + _CAUSE_GRACE
        _join([p for r, p in enumerate(self.procs) if r not in self.dead])
        return [self.results.get(r) for r in range(n)]

    def _check(self, now: float, late: bool) -> None:
        if self.failures:
            cause = min(self.failures, key=lambda f: (f.priority, f.rank))
            if cause.priority == 0 or late or now >= self.grace_end:
                raise _error(cause)
        if late:
            running = [r for r in range(len(self.procs))
                       if r not in self.results and r not in self.dead]
            raise WorkerFailure(f"launch: the run did not finish within its deadline of "
                                f"{self.timeout:g} s; workers {running} were still running")

    def _collect(self, ready: list[Any]) -> None:
        for rank, conn in list(self.open_conns.items()):
            if conn in ready or self.running.get(rank) in ready:  # a report, or an exit
                self._read(rank, conn)
        for rank, sentinel in list(self.running.items()):
            if sentinel not in ready:
                continue
            del self.running[rank]
            self.procs[rank].join(1.0)  # reap it: its exit code is known after waitpid
            if rank in self.open_conns:
                # It may have exited right after reporting: drain its pipe before concluding
                # that it returned nothing (seen once in CI as a spurious failure).
                self._read(rank, self.open_conns[rank], wait=1.0)
            if rank not in self.results and all(f.rank != rank for f in self.failures):
                reason = _exit_reason(self.procs[rank].exitcode)
                if not reason.startswith("killed"):
                    reason += " without returning a result"
                step = self.board.last_step(rank)
                if step is not None:
                    reason += f" after step {step}"
                if rank in self.survivable:
                    self._bury(rank, reason)
                else:
                    self.failures.append(Failure(0, rank, f"worker {rank} died: {reason}"))

    def _bury(self, rank: int, reason: str) -> None:
        """A death the run survives: tell the survivors through the board, and say so."""
        self.dead.add(rank)
        self.board.died_at[rank] = time.time()
        self.board.dead[rank] = 1
        print(f"warning: worker {rank} died: {reason}; the run carries on without it "
              "(--on-failure continue)", file=sys.stderr, flush=True)

    def _read(self, rank: int, conn: mp.connection.Connection, wait: float = 0.0) -> None:
        """Take worker `rank`'s report if one is waiting (up to `wait` seconds)."""
        try:
            if not conn.poll(wait):
                return
            kind, payload = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            del self.open_conns[rank]  # it died before reporting: its exit tells why
            return
        except Exception as e:  # a result that cannot be unpickled here
            kind, payload = "error", Failure(0, rank, f"worker {rank} failed: its result could "
                                              f"not be unpickled in the parent: {e!r}")
        del self.open_conns[rank]
        if kind == "ok":
            self.results[rank] = payload
        else:
            self.failures.append(payload)


def _error(failure: Failure) -> Exception:
    error: Exception = (UsageError if failure.usage else WorkerFailure)(failure.message)
    if failure.remote_traceback:
        error.__cause__ = _RemoteTraceback(failure.remote_traceback)
    return error


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _join(procs: list[Any]) -> None:
    """Let workers that returned their results exit; `_terminate` ends the slow ones."""
    end = time.monotonic() + _EXIT_GRACE
    for rank, p in enumerate(procs):
        p.join(max(0.0, end - time.monotonic()))
        if p.exitcode not in (0, None):  # the results stand, but something is wrong
            warnings.warn(f"worker {rank} {_exit_reason(p.exitcode)} after returning its "
                          "result", RuntimeWarning, stacklevel=3)


def _terminate(procs: list[Any]) -> None:
    terminate(procs, _TERM_GRACE)


def terminate(procs: list[Any], grace: float) -> None:
    """SIGTERM every live process, SIGKILL those still alive after `grace` seconds; reap all
    (the launcher's workers, and compare's pool)."""
    live = [p for p in procs if p.is_alive()]
    for p in live:
        with contextlib.suppress(OSError):
            p.terminate()
    end = time.monotonic() + grace
    for p in live:
        p.join(max(0.0, end - time.monotonic()))
    for p in live:
        if p.is_alive():
            with contextlib.suppress(OSError):
                p.kill()
            p.join()
