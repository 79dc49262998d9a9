"""Hosts on one Linux machine: network namespaces joined by veth pairs, optionally rate-shaped.

For the multi-machine test and the network benchmark: each host is a network namespace with its
own interface ``eth0`` (address 10.77.0.<i+1>/24) and loopback, so processes inside it see a
machine of their own and talk to the others only over that interface. Two hosts are joined by one
veth pair; more hosts hang off a bridge in a "switch" namespace. With `rate`, every interface's
egress is shaped by a token-bucket filter (``tc qdisc ... tbf``), so each host's link carries at
most `rate` bit/s in each direction, like a NIC of that speed.

Needs root and iproute2. `Hosts` always cleans up, on errors and on SIGTERM too: it kills every
process it started (their process groups, then anything left inside its namespaces) and deletes
its namespaces, which deletes their veth ends::

    with Hosts(2, rate=100e6) as hosts:
        proc = hosts.popen(1, ["python", "-c", "print('on host 1')"])
        proc.wait(timeout=30)

Namespace names start with ``PREFIX`` and carry the creator's pid, so parallel runs never collide,
and `remove_stale` deletes those whose creator died without cleaning up (SIGKILL).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from distsgd.errors import UsageError

PREFIX = "distsgd-"
IFNAME = "eth0"  # the name of every host's interface inside its namespace (GLOO_SOCKET_IFNAME)
SUBNET = "10.77.0"
_COUNTER = itertools.count()
_TIMEOUT = 20.0  # seconds any one `ip`/`tc` call may take


@dataclass(frozen=True)
class Host:
    """One namespaced host: run commands in it with ``ip netns exec <netns>``."""

    index: int
    netns: str
    address: str  # its IPv4 address on IFNAME


def unavailable() -> str | None:
    """Why namespaces cannot be created here (a sentence), or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        _sh("ip", "netns", "add", probe)
    except (OSError, subprocess.SubprocessError) as e:
        return f"`ip netns add` failed: {e}"
    finally:
        _sh("ip", "netns", "delete", probe, check=False)
    return None


def namespaces(prefix: str = PREFIX) -> list[str]:
    """The network namespaces whose names start with `prefix`."""
    out = _sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces left by creators that no longer run (killed with SIGKILL); their names."""
    removed = []
    for name in namespaces(prefix):
        pid = name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            _kill_inside(name)
            _sh("ip", "netns", "delete", name, check=False)
            removed.append(name)
    return removed


class Hosts:
    """`count` hosts in network namespaces; a context manager that always cleans up.

    `rate`: bits per second of each host's link in each direction (None: unshaped). `burst`:
    the token bucket's depth in bytes (None: 1 ms of traffic, at least 64 KiB so that a
    segmentation-offloaded packet always fits).
    """

    def __init__(self, count: int = 2, rate: float | None = None,
                 burst: int | None = None) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= 250:
            raise UsageError(f"hosts: count={count!r} is out of range; valid values lie in "
                             "[2, 250]")
        if rate is not None and not rate > 0:
            raise UsageError(f"hosts: rate={rate!r} is not valid; valid values: a positive "
                             "number of bits per second, or None (unshaped)")
        self.count, self.rate = count, rate
        self.burst = burst if burst is not None else max(65536, int((rate or 0) / 8 / 1000))
        tag = f"{PREFIX}{os.getpid()}-{next(_COUNTER)}"
        self.hosts = [Host(i, f"{tag}-h{i}", f"{SUBNET}.{i + 1}") for i in range(count)]
        self._switch = f"{tag}-sw" if count > 2 else None
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()
        self._saved_sigterm: Any = None

    # ------------------------------------------------------------------ set-up, clean-up
    def __enter__(self) -> Hosts:
        remove_stale()  # what runs killed with SIGKILL left behind (their creators are gone)
        self._catch_sigterm()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _create(self) -> None:
        for host in self.hosts:
            _sh("ip", "netns", "add", host.netns)
            _sh("ip", "-n", host.netns, "link", "set", "lo", "up")
        if self._switch is None:
            self._pair(self.hosts[0], self.hosts[1].netns, IFNAME)
        else:
            _sh("ip", "netns", "add", self._switch)
            _sh("ip", "-n", self._switch, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", self._switch, "link", "set", "br0", "up")
            for host in self.hosts:
                port = f"p{host.index}"
                self._pair(host, self._switch, port)
                _sh("ip", "-n", self._switch, "link", "set", port, "master", "br0")
                _sh("ip", "-n", self._switch, "link", "set", port, "up")
                self._shape(self._switch, port)  # what the switch sends to the host: its ingress
        for host in self.hosts:
            _sh("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", IFNAME)
            _sh("ip", "-n", host.netns, "link", "set", IFNAME, "up")
            self._shape(host.netns, IFNAME)

    def _pair(self, host: Host, peer_netns: str, peer_name: str) -> None:
        """A veth pair with one end, IFNAME, in `host` and the other, `peer_name`, in `peer_netns`.

        Created inside the host's namespace, so the temporary names never meet another run's.
        """
        _sh("ip", "-n", host.netns, "link", "add", IFNAME, "type", "veth", "peer", "name",
            peer_name, "netns", peer_netns)

    def _shape(self, netns: str, dev: str) -> None:
        if self.rate is None:
            return
        # latency bounds the queue: 50 ms of traffic waits at most before it is dropped.
        _sh("ip", "netns", "exec", netns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", f"{int(self.rate)}bit", "burst", str(self.burst), "latency", "50ms")

    def close(self) -> None:
        """Kill every process started in the hosts and delete the namespaces (idempotent)."""
        try:
            with self._lock:
                procs, self._procs = self._procs, []
            for proc in procs:
                _kill_group(proc)
            names = [h.netns for h in self.hosts] + ([self._switch] if self._switch else [])
            for name in names:
                _kill_inside(name)
                _sh("ip", "netns", "delete", name, check=False)
        finally:
            self._restore_sigterm()

    def _catch_sigterm(self) -> None:
        # SIGTERM would end the process without running `finally`: turn it into SystemExit.
        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        self._saved_sigterm = signal.signal(signal.SIGTERM, on_term)

    def _restore_sigterm(self) -> None:
        if self._saved_sigterm is not None:
            signal.signal(signal.SIGTERM, self._saved_sigterm)
            self._saved_sigterm = None

    # ------------------------------------------------------------------- running things
    def popen(self, index: int, argv: Sequence[str], env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` on host `index` in a new session (so that it can be killed as a group)."""
        if not 0 <= index < self.count:
            raise UsageError(f"hosts: index={index} is out of range; valid values lie in "
                             f"[0, {self.count - 1}]")
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[index].netns, *argv],
                                env=full_env, start_new_session=True, **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def run(self, index: int, argv: Sequence[str], timeout: float,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` on host `index` to the end (killed after `timeout` s); its output as text."""
        proc = self.popen(index, argv, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            _kill_group(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


# ------------------------------------------------------------------------------ helpers
def _sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT)
    if check and done.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the process group of `proc` (it leads its own session) and reap `proc`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_TIMEOUT)


def _kill_inside(netns: str) -> None:
    """SIGKILL whatever still runs in `netns` (only this run's processes can be in it)."""
    for pid in _sh("ip", "netns", "pids", netns, check=False).split():
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


# ------------------------------------------------------------------------- torchrun jobs
RDZV_PORT = 29400  # free by construction: each run's namespaces are its own


def torchrun(hosts: Hosts, args: Sequence[str], nproc_per_node: int, timeout: float,
             env: Mapping[str, str] | None = None,
             module: str = "distsgd") -> list[subprocess.CompletedProcess[str]]:
    """Run ``torchrun ... -m <module> <args>`` on every host at once; their outputs, host order.

    The c10d rendezvous lives on host 0. torchrun needs two hints there: ``is_host`` (it decides
    whether to serve the rendezvous store by comparing the endpoint with the machine's hostname,
    which a namespace shares with the real machine) and ``--local-addr`` (else it tells the
    workers MASTER_ADDR = the hostname, which resolves to loopback). Every process is killed
    after `timeout` seconds; the outputs then end with a note saying so.
    """
    torchrun_bin = str(Path(sys.executable).with_name("torchrun"))
    rdzv_id = f"distsgd-{os.getpid()}-{next(_COUNTER)}"
    procs = []
    for host in hosts.hosts:
        argv = [torchrun_bin, f"--nnodes={hosts.count}", f"--nproc-per-node={nproc_per_node}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={hosts.hosts[0].address}:{RDZV_PORT}",
                f"--rdzv-id={rdzv_id}", f"--rdzv-conf=is_host={int(host.index == 0)}",
                f"--local-addr={host.address}", "--max-restarts=0", "-m", module, *args]
        procs.append(hosts.popen(host.index, argv, {"LOGLEVEL": "INFO", **(env or {})},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    outputs = [""] * len(procs)
    readers = [threading.Thread(target=_drain, args=(p, outputs, i), daemon=True)
               for i, p in enumerate(procs)]
    for r in readers:
        r.start()
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for p in procs:
        _kill_group(p)  # a torchrun agent that returned may leave nothing; one that hangs, stops
    for r in readers:
        r.join(timeout=_TIMEOUT)
    note = f"\n[killed after the {timeout:g} s timeout]" if timed_out else ""
    return [subprocess.CompletedProcess(p.args, p.returncode if not timed_out else -9,
                                        outputs[i] + note, None) for i, p in enumerate(procs)]


def _drain(proc: subprocess.Popen[str], outputs: list[str], i: int) -> None:
    assert proc.stdout is not None
    outputs[i] = proc.stdout.read()
