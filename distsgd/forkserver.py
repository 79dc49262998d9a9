"""How `distsgd.launch` starts its worker processes: forked from a server that imported torch once.

A worker started with multiprocessing's "spawn" is a fresh interpreter: it imports torch,
torch._dynamo (which torch imports lazily at the first ``torch.optim`` optimizer), distsgd and
scikit-learn's dataset loaders again, seconds of CPU each, for every worker of every run. With
"forkserver" a server process, started once per launching process, imports them once
(`PRELOAD`) and forks each worker from that state. The server imports only: no CUDA, no thread
pool, no process group is started in it (forking a process that has threads can hang the child),
and it is started with ``OMP_NUM_THREADS`` set so that no BLAS/OpenMP threads start either.

A forked worker inherits the server's state, not the launcher's, so the launcher hands each
worker what spawn used to copy: `Inherited` carries the launch's environment (applied first
thing, before the worker reads any of it) and the launcher's current stdout and stderr (a test
that captures them, or a shell redirection made after the server started, sees the workers'
output). The server starts with the launcher's environment of that moment: variables that torch
reads while it is imported take those values.

The start method: "forkserver" on Linux for CPU runs; "spawn" elsewhere, for CUDA runs (the
server must not touch CUDA, and one that imported torch is one call away from it), and when
``DISTSGD_START_METHOD=spawn`` asks for it (the way back if the server misbehaves somewhere).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import multiprocessing.forkserver
import multiprocessing.reduction
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from distsgd.errors import UsageError

START_METHOD_ENV = "DISTSGD_START_METHOD"
START_METHODS = ("forkserver", "spawn")
# Imported by the server, each skipped if it cannot be (scikit-learn is optional). torch._dynamo
# is what the first optimizer would import lazily; distsgd.cli is what the `distsgd` command's
# workers import again as its main script.
PRELOAD = ("torch", "torch._dynamo", "sklearn.datasets", "distsgd.runtime", "distsgd.cli",
           "distsgd.worker_process", "distsgd.forkserver")
_SERVER_ENV = "DISTSGD_FORKSERVER"  # set only in the server's environment, as it starts

if os.environ.pop(_SERVER_ENV, None) == "1":
    # This is the server, importing `PRELOAD`. It exits when its launcher does, and the
    # interpreter's usual exit, with torch and scikit-learn loaded, takes seconds (20 s on a busy
    # machine): so long a process outlives its launcher. It holds nothing to flush or close, and
    # its forked workers never run atexit handlers (multiprocessing ends them with os._exit).
    atexit.register(os._exit, 0)


def start_method(device: str) -> str:
    """The multiprocessing start method for workers on `device` (see the module's docstring)."""
    chosen = os.environ.get(START_METHOD_ENV, "")
    if chosen and chosen not in START_METHODS:
        raise UsageError(f"{START_METHOD_ENV}={chosen!r} is not a start method; valid choices: "
                         f"{', '.join(START_METHODS)}")
    if (chosen == "spawn" or device != "cpu" or not sys.platform.startswith("linux")
            or "forkserver" not in mp.get_all_start_methods()):
        return "spawn"
    return "forkserver"


def context(method: str, omp_threads: str) -> Any:
    """The multiprocessing context for `method`; for "forkserver", its server is running.

    Call it with the launcher's start lock held: the server is started with `omp_threads` as
    its ``OMP_NUM_THREADS``, set in this process's environment for that moment.
    """
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))
        with environ({"OMP_NUM_THREADS": omp_threads, _SERVER_ENV: "1"}):
            multiprocessing.forkserver.ensure_running()
    return ctx


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (a spawned process copies the environment)."""
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


class _Fd:
    """A file descriptor of the launcher, sent to a forked worker as a duplicate."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        # DupFd registers the descriptor with the forkserver request being pickled.
        return _rebuild_fd, (multiprocessing.reduction.DupFd(self.fd),)


def _rebuild_fd(dup: Any) -> _Fd:
    return _Fd(dup.detach())


class Inherited:
    """What a worker forked by the server would otherwise miss of its launcher: the
    environment of this launch and the launcher's current stdout and stderr."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.streams: dict[int, _Fd] = {}
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                os.fstat(fd)  # a launcher may run with a standard stream closed
                self.streams[fd] = _Fd(fd)

    def apply(self) -> None:
        """In the worker: take the launcher's environment and streams, and let the server exit
        when the launcher does (a worker that held the server's "alive" pipe would keep it up)."""
        os.environ.clear()
        os.environ.update(self.env)
        for target, fd in self.streams.items():
            with contextlib.suppress(OSError):
                (sys.stdout if target == 1 else sys.stderr).flush()
                os.dup2(fd.fd, target)
                os.close(fd.fd)
        server: Any = multiprocessing.forkserver._forkserver
        alive = getattr(server, "_forkserver_alive_fd", None)
        if alive is not None:
            with contextlib.suppress(OSError):
                os.close(alive)
            server._forkserver_alive_fd = None
