"""Process-group set-up: rendezvous, gloo's default group, and joining a job torchrun started.

`init_process_group` initialises torch.distributed's default group for a `TorchComm`; the local
launcher (`distsgd.launch`) calls it in each worker with a `file_rendezvous`. Under torchrun,
`from_torchrun_env()` builds the communicator from torchrun's environment (``env://``), and every
rank ends with `shutdown(comm)`; `join_torchrun` and `tell_all` let a job's ranks agree on
starting (one rank claims the run folder) before any communicator exists::

    comm = from_torchrun_env(timeout=60.0)   # None outside torchrun
    try:
        ...
    finally:
        shutdown(comm)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from distsgd.comm.torch.collectives import GLOO_BACKENDS
from distsgd.comm.torch.comm import TorchComm
from distsgd.errors import CommTimeout, UsageError, check_range

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Whether this process's default group is one init_process_group made: shutdown destroys only
# that one, so a group the user initialised outlives their DistributedOptimizer.
_opened = [False]


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
        backend = GLOO_BACKENDS[1]  # CUDA tensors on NCCL, the mailbox on gloo
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    _opened[0] = True


def shutdown(comm: TorchComm | None, timeout: float | None = None) -> None:
    """End this process's part of a run: `comm.close(timeout)`, then destroy the process group
    if `init_process_group` made it (one the user initialised is left to them).

    Call it on every rank, e.g. in a ``finally``. While an exception is propagating it skips the
    collective close (the peers may be waiting on this rank) and only destroys the group.
    """
    try:
        if comm is not None and sys.exc_info()[0] is None:
            comm.close(timeout)
    finally:
        if _opened[0] and dist.is_initialized():
            dist.destroy_process_group()
        _opened[0] = False


def is_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment variables are set)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def from_torchrun_env(timeout: float = 300.0, device: str = "cpu") -> TorchComm | None:
    """The `TorchComm` of this torchrun worker (``env://`` rendezvous), or of the default group
    the user initialised themselves (torchrun or not); None otherwise.

    Before gloo starts, it binds gloo to the interface that reaches the rendezvous
    (`torchrun_interface`) unless ``GLOO_SOCKET_IFNAME`` says otherwise: gloo would otherwise
    use the address the machine's hostname resolves to, which on many hosts (and in network
    namespaces) is loopback or an address the other machines cannot reach. Afterwards,
    ``comm.nodes`` holds the torchrun node (GROUP_RANK) of every global rank, which is what
    "one group per machine" means (crossover's ``groups=-1``). Every rank must end with
    `shutdown(comm)`.
    """
    if not dist.is_initialized():
        if not is_torchrun():
            return None
        join_torchrun(timeout, device)
    nodes = _gather_nodes(dist.get_world_size())
    comm = TorchComm(timeout)
    comm.nodes = nodes
    return comm


def join_torchrun(timeout: float, device: str = "cpu") -> None:
    """Initialise the default group of this torchrun worker (``env://``), and no communicator
    yet: the ranks can agree on whether to start (`tell_all`) with no mailbox thread to wind
    down if they do not. `from_torchrun_env` then builds the communicator on this group."""
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        ifname = torchrun_interface(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        if ifname is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
    init_process_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://",
                       timeout, device=device)


def tell_all(source: int, text: str | None, timeout: float) -> str | None:
    """Rank `source`'s `text` (None: nothing to tell), on every rank of the default group.

    How the ranks of a job learn that the one which set something up for all of them (the run
    folder) failed, so that they all stop at once instead of each waiting out its timeout.
    Raises `CommTimeout` when `source` does not answer within `timeout` seconds (the group's
    timeout, set by `init_process_group`).
    """
    mine = dist.get_rank() == source
    data = (text or "").encode() if mine else b""
    try:
        size = torch.tensor([len(data) if mine and text is not None else -1], dtype=torch.int64)
        dist.broadcast(size, src=source)
        length = int(size.item())
        if length <= 0:
            return None if length < 0 else ""
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if mine
                  else torch.empty(length, dtype=torch.uint8))
        dist.broadcast(buffer, src=source)
    except RuntimeError as e:  # gloo's timeout or a lost peer: DistBackendError and kin
        raise CommTimeout(f"rank {source} did not say within {timeout:g} s whether the run "
                          f"starts: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                          ) from None
    return buffer.numpy().tobytes().decode(errors="replace")


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
