"""Real processes: start N local gloo workers, or join a job that torchrun started.

`launch(fn, n)` runs ``fn(comm, *args)`` in n fresh processes (``spawn``), each with a `TorchComm`
over a gloo group that meets through a file in a fresh temporary directory, and returns the n
results in rank order. It never leaves a process behind and never hangs past its deadline: the
first worker that raises or dies ends the run, the others are terminated (SIGTERM, then SIGKILL),
and the error names the worker and the last step it reported (`note_step`). Children also die
with the parent (PR_SET_PDEATHSIG on Linux, a watchdog thread elsewhere).

With ``on_failure="continue"`` a worker that dies without reporting (killed, crashed) does not end
the run unless its rank is `essential`: the launcher marks it dead on a shared board, a thread in
every survivor tells its communicator (`TorchComm.mark_dead`), and the dead rank's result is None.
A worker that raises still ends the run. ``DISTSGD_KILL=RANK:STEP[,RANK:STEP]`` makes rank RANK
SIGKILL itself once it has reported step STEP: a deterministic failure for tests and drills.

    def work(comm, scale):                     # module level: it is pickled by reference
        t = torch.full((2,), float(comm.rank) * scale)
        return comm.all_reduce_(t).tolist()

    launch(work, 4, args=(1.0,))               # [[6.0, 6.0], [6.0, 6.0], ...]

Under torchrun, `from_torchrun_env()` builds the communicator from torchrun's environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distsgd.comm.base import set_current
from distsgd.comm.torch import PeerLost, TorchComm
from distsgd.errors import (
    CommTimeout,
    DivergenceError,
    PeerDied,
    UsageError,
    WorkerFailure,
    check_range,
)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# After a failure that is usually a consequence (a timeout, a lost peer), how long to wait for
# the worker that caused it to report, so that the error names the cause.
_CAUSE_GRACE = 2.0
_TERM_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
_EXIT_GRACE = 10.0  # seconds a worker that returned its result may take to exit
_START_LOCK = threading.Lock()  # launches from several threads set os.environ one at a time
_WATCH_PERIOD = 0.05  # seconds between a survivor's looks at the board for deaths
ON_FAILURE = ("stop", "continue")
KILL_VARIABLE = "DISTSGD_KILL"


# ---------------------------------------------------------------------------- rendezvous
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def file_rendezvous() -> Iterator[str]:
    """A ``file://`` init method in a fresh temporary directory, removed afterwards."""
    folder = tempfile.mkdtemp(prefix="distsgd-rendezvous-")
    try:
        yield Path(folder, "store").as_uri()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def init_process_group(rank: int, world_size: int, rendezvous: str, timeout: float,
                       join_timeout: float | None = None, device: str = "cpu") -> None:
    """Initialise the default gloo process group with `timeout` seconds for every operation.

    `device` "cuda": this process takes its own GPU, cuda:(LOCAL_RANK % GPUs) (LOCAL_RANK: set by
    torchrun, else `rank`), and the group is torch's multi-backend "cpu:gloo,cuda:nccl": the
    collectives on CUDA tensors run on NCCL, the mailbox (CPU copies) stays on gloo.

    `rendezvous` is a torch init method: ``file://...``, ``tcp://host:port`` or ``env://``. The
    ranks first wait for each other on the rendezvous store for up to `join_timeout` seconds
    (default: max(timeout, 120)), since starting processes may take longer than a short timeout.
    """
    check_range("timeout", timeout, 0.0, low_open=True)
    if not 0 <= rank < world_size:
        raise UsageError(f"rank={rank} is out of range for world_size={world_size}")
    join = max(timeout, 120.0) if join_timeout is None else join_timeout
    store, rank, world_size = next(dist.rendezvous(
        rendezvous, rank, world_size, timeout=timedelta(seconds=join)))
    store.set_timeout(timedelta(seconds=join))
    # torchrun may keep its store across restarts: a fresh namespace for each.
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    joined = dist.PrefixStore(f"distsgd/{restart}/join/", store)
    if joined.add("count", 1) >= world_size:
        joined.set("all", "1")
    joined.wait(["all"])
    backend = "gloo"
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))


def shutdown(comm: TorchComm | None, timeout: float | None = None) -> None:
    """End this process's part of a run: `comm.close(timeout)`, then destroy the process group.

    Call it on every rank, e.g. in a ``finally``. While an exception is propagating it skips the
    collective close (the peers may be waiting on this rank) and only destroys the group.
    """
    try:
        if comm is not None and sys.exc_info()[0] is None:
            comm.close(timeout)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- torchrun
def is_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment variables are set)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def from_torchrun_env(timeout: float = 300.0, device: str = "cpu") -> TorchComm | None:
    """The `TorchComm` of this torchrun worker (``env://`` rendezvous), or None outside torchrun.

    Before gloo starts, it binds gloo to the interface that reaches the rendezvous
    (`torchrun_interface`) unless ``GLOO_SOCKET_IFNAME`` says otherwise: gloo would otherwise
    use the address the machine's hostname resolves to, which on many hosts (and in network
    namespaces) is loopback or an address the other machines cannot reach. Afterwards,
    ``comm.nodes`` holds the torchrun node (GROUP_RANK) of every global rank, which is what
    "one group per machine" means (crossover's ``groups=-1``). Every rank must end with
    `shutdown(comm)`.
    """
    if not is_torchrun():
        return None
    if not dist.is_initialized():
        if "GLOO_SOCKET_IFNAME" not in os.environ:
            ifname = torchrun_interface(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
            if ifname is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
        init_process_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://",
                           timeout, device=device)
    nodes = _gather_nodes(dist.get_world_size())
    comm = TorchComm(timeout)
    comm.nodes = nodes
    return comm


def torchrun_interface(master_addr: str, master_port: int) -> str | None:
    """The name of the network interface this machine uses to reach `master_addr` (Linux).

    None where it cannot be told (another OS, no route, an address on no interface): gloo then
    keeps its own choice.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        family = socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family[0], socket.SOCK_DGRAM) as probe:
            probe.connect(family[4])  # UDP: picks the route and source address, sends nothing
            local = probe.getsockname()[0]
    except OSError:
        return None
    for _, name in socket.if_nameindex():
        if _interface_address(name) == local:
            return name
    return None


def _interface_address(name: str) -> str | None:
    """The IPv4 address of interface `name` (SIOCGIFADDR), or None."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])


def _gather_nodes(world_size: int) -> tuple[int, ...]:
    """The torchrun node (GROUP_RANK) of every global rank, gathered once at start-up.

    Gathered rather than computed from LOCAL_WORLD_SIZE, since nodes may run different numbers
    of processes. Outside the byte counts: it is set-up, not training traffic.
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    node = int(os.environ.get("GROUP_RANK", dist.get_rank() // max(local_world, 1)))
    nodes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(nodes, torch.tensor([node], dtype=torch.int64))
    return tuple(int(t.item()) for t in nodes)


# ---------------------------------------------------------------------------- launching
@dataclass(frozen=True)
class _Spec:
    """What every worker process needs (pickled into it by ``spawn``)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    world_size: int
    rendezvous: str
    comm_timeout: float
    deadline: float | None  # time.time() by which the run must end
    parent_pid: int
    carry_on: bool = False  # on_failure == "continue"
    kill_at: tuple[tuple[int, int], ...] = ()  # (rank, step): SIGKILL after that step
    device: str = "cpu"  # cuda: each process its own GPU, NCCL for collectives


class _Board:
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
    """This worker's view of the board (set in `_worker_main`)."""

    def __init__(self, board: _Board, rank: int, kill_at: int | None) -> None:
        self.board, self.rank, self.kill_at = board, rank, kill_at


_here: _WorkerBoard | None = None


def note_step(step: int) -> None:
    """Record that this worker completed `step`, for the launcher's message if it dies (and
    apply ``DISTSGD_KILL``); a no-op outside a launched worker."""
    if _here is None:
        return
    _here.board.progress[_here.rank] = step
    if step == _here.kill_at:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def deaths() -> dict[int, tuple[int | None, float]]:
    """The ranks the launcher declared dead in this run: the last step each reported, and the
    time.time() at which the launcher saw it die."""
    if _here is None:
        return {}
    board = _here.board
    return {r: (board.last_step(r), board.died_at[r]) for r in range(len(board.dead))
            if board.dead[r]}


def parse_kill(text: str, world_size: int) -> tuple[tuple[int, int], ...]:
    """``RANK:STEP[,RANK:STEP]`` (the `DISTSGD_KILL` variable) as (rank, step) pairs."""
    out = []
    for item in filter(None, text.split(",")):
        rank, sep, step = item.partition(":")
        try:
            pair = (int(rank), int(step))
        except ValueError:
            pair = (-1, -1)
        if not sep or not 0 <= pair[0] < world_size or pair[1] < 0:
            raise UsageError(f"{KILL_VARIABLE}={text!r}: {item!r} is not RANK:STEP with RANK in "
                             f"0..{world_size - 1} and STEP >= 0 (e.g. {KILL_VARIABLE}=1:20)")
        out.append(pair)
    return tuple(out)


@dataclass(frozen=True)
class _Failure:
    """A worker's failure; lower `priority` is more likely the cause of the others."""

    priority: int  # 0: raised or died; 1: timed out; 2: lost a peer
    rank: int
    message: str
    usage: bool = False
    remote_traceback: str = ""


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
    `device` "cuda": each process its own GPU and NCCL for collectives (`init_process_group`).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size={world_size!r} must be a positive integer")
    if timeout is not None:
        check_range("timeout", timeout, 0.0, low_open=True)
    check_range("comm_timeout", comm_timeout, 0.0, low_open=True)
    if on_failure not in ON_FAILURE:
        raise UsageError(f"unknown on_failure {on_failure!r}; valid choices: "
                         f"{', '.join(ON_FAILURE)}")
    kill_at = parse_kill({**os.environ, **(env or {})}.get(KILL_VARIABLE, ""), world_size)
    deadline = None if timeout is None else time.monotonic() + timeout
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    conns: list[mp.connection.Connection] = []
    board = _Board(ctx, world_size)
    with file_rendezvous() as url:
        spec = _Spec(fn, tuple(args), world_size, url, comm_timeout,
                     None if timeout is None else time.time() + timeout, os.getpid(),
                     on_failure == "continue", kill_at, device)
        try:
            with _START_LOCK, _environ(_worker_env(env)):
                for rank in range(world_size):
                    reader, writer = ctx.Pipe(duplex=False)
                    conns.append(reader)
                    proc = ctx.Process(target=_worker_main, args=(rank, spec, writer, board),
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


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables while the workers start (spawn copies the environment)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Supervisor:
    """Collects every worker's result; on the first failure, raises its most likely cause."""

    def __init__(self, procs: list[Any], conns: list[mp.connection.Connection],
                 deadline: float | None, timeout: float | None, board: _Board,
                 survivable: set[int]) -> None:
        self.procs, self.deadline, self.timeout = procs, deadline, timeout
        self.board, self.survivable = board, survivable
        self.dead: set[int] = set()
        self.results: dict[int, Any] = {}
        self.failures: list[_Failure] = []
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
                    self.failures.append(_Failure(0, rank, f"worker {rank} died: {reason}"))

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
            kind, payload = "error", _Failure(0, rank, f"worker {rank} failed: its result could "
                                              f"not be unpickled in the parent: {e!r}")
        del self.open_conns[rank]
        if kind == "ok":
            self.results[rank] = payload
        else:
            self.failures.append(payload)


def _error(failure: _Failure) -> Exception:
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
    """SIGTERM every live worker, SIGKILL those still alive after a grace period; reap all."""
    live = [p for p in procs if p.is_alive()]
    for p in live:
        with contextlib.suppress(OSError):
            p.terminate()
    end = time.monotonic() + _TERM_GRACE
    for p in live:
        p.join(max(0.0, end - time.monotonic()))
    for p in live:
        if p.is_alive():
            with contextlib.suppress(OSError):
                p.kill()
            p.join()


# ---------------------------------------------------------------------------- in the worker
def _worker_main(rank: int, spec: _Spec, conn: mp.connection.Connection, board: _Board) -> None:
    global _here
    _die_with_parent(spec.parent_pid)
    _name_process(f"distsgd-rank{rank}")
    torch.set_num_threads(1)
    _here = _WorkerBoard(board, rank, dict(spec.kill_at).get(rank))
    comm: TorchComm | None = None
    try:
        init_process_group(rank, spec.world_size, spec.rendezvous, spec.comm_timeout,
                           device=spec.device)
        comm = TorchComm(spec.comm_timeout, carry_on=spec.carry_on)
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
    dist.destroy_process_group()


def _watch_deaths(comm: TorchComm, board: _Board) -> None:
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
        failure = _Failure(0, rank, f"worker {rank} failed: its result cannot be pickled: {e!r}")
        conn.send_bytes(pickle.dumps(("error", failure)))


def _describe(rank: int, error: BaseException) -> _Failure:
    line = "".join(traceback.format_exception_only(type(error), error)).strip()
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    if isinstance(error, UsageError):
        return _Failure(0, rank, str(error), usage=True, remote_traceback=text)
    consequence = isinstance(error, (PeerLost, PeerDied))  # of another worker's failure
    priority = 2 if consequence else 1 if isinstance(error, CommTimeout) else 0
    if isinstance(error, DivergenceError):  # its message already names the worker and step
        return _Failure(priority, rank, str(error), remote_traceback=text)
    return _Failure(priority, rank, f"worker {rank} failed: {line}", remote_traceback=text)


def _name_process(name: str) -> None:
    """Show the rank in `ps` and /proc/PID/comm (Linux), so an operator can tell workers apart."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15])  # PR_SET_NAME


def _die_with_parent(parent_pid: int) -> None:
    """Make this process die when the launching process dies, however it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="distsgd-parent-watch", daemon=True).start()
