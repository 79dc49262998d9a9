"""The parameter-server protocol on the wire: message kinds, the header, the reply's tail.

Server-bound, every message starts with a header of 4 float64, (kind, version, clock, count);
kinds that carry a payload send it next, sized by the header. Per-pair FIFO order keeps each
header next to its payload without tags. Every reply to a pull or an elastic exchange is the
shard followed by the server's version and lowest worker clock as raw float64 bits.

The paper's protocol is PUSH (dense or sparse), PULL, ELASTIC and DONE. What measurement and
checkpoints ask of a server (its evaluated model, its state) is not part of it: those go through
one SERVICE kind whose count names the request (`SERVICES`), answered by one length-prefixed
`checkpoint_wire.to_bytes` message, outside the byte counts.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from distsgd import mixing
from distsgd.checkpoint import walk
from distsgd.checkpoint import wire as checkpoint_wire
from distsgd.comm.base import Comm
from distsgd.errors import ProtocolError

PUSH, PUSH_SPARSE, PULL, ELASTIC, DONE, SERVICE = range(1, 7)
KINDS = (PUSH, PUSH_SPARSE, PULL, ELASTIC, DONE, SERVICE)
HEADER = 4
SERVICES = ("snapshot", "checkpoint")  # SERVICE's requests, by their number in the count field


class Header(NamedTuple):
    kind: int
    version: int  # the server version the sender last saw (a push's staleness is measured by it)
    clock: float  # SSP: the sender's clock (pushes), or the clock a pull needs
    number: int  # the header's count: sparse pushes, entries sent; SERVICE, the request


def header(kind: int, version: int = 0, clock: float = 0.0, count: int = 0) -> torch.Tensor:
    return torch.tensor([kind, version, clock, count], dtype=torch.float64)


def check_header(raw: torch.Tensor, *, version: int, size: int, src: int, rank: int) -> Header:
    """The header from `src`, or ProtocolError naming the sender: the header is all a worker
    controls, so it is checked before it sizes or indexes anything. `version` and `size` are the
    receiving server's version and shard size."""
    kind, seen, clock, count = raw.tolist()
    problem = ""
    if not all(math.isfinite(v) and v == int(v) for v in (kind, seen, count)):
        problem = f"kind, version and count must be whole numbers, not {raw.tolist()}"
    elif not 0 <= seen <= version:
        problem = f"version {int(seen)} is outside 0..{version} (this server's)"
    elif not 0 <= count <= size:
        problem = f"count {int(count)} is outside 0..{size} (the shard's size)"
    elif math.isnan(clock):
        problem = "its clock is NaN"
    elif int(kind) not in KINDS:
        problem = f"unknown kind {int(kind)}"
    elif int(kind) == SERVICE and int(count) >= len(SERVICES):
        problem = f"unknown service request {int(count)}; valid: 0..{len(SERVICES) - 1}"
    if problem:
        raise ProtocolError(f"server rank {rank} rejected a header from rank {src}: {problem}")
    return Header(int(kind), int(seen), clock, int(count))


def shard_bounds(numel: int, shards: int) -> list[tuple[int, int]]:
    """[start, end) of each server's shard of the flat model: contiguous, near-equal pieces."""
    return mixing.equal_segments(numel, min(shards, numel))


def tail_slots(dtype: torch.dtype) -> int:
    """Elements of `dtype` a reply's tail of two float64 (version, lowest clock) takes."""
    return 2 * mixing.weight_slots(dtype)


def pack_reply(x: torch.Tensor, version: int, lowest_clock: float) -> torch.Tensor:
    """x, then the version and the lowest live worker's clock (-1: none live) as float64 bits."""
    clock = lowest_clock if math.isfinite(lowest_clock) else -1.0
    tail = torch.tensor([float(version), clock], dtype=torch.float64, device=x.device)
    return torch.cat([x, tail.view(x.dtype)])


def unpack_reply(reply: torch.Tensor, size: int) -> tuple[torch.Tensor, int, float]:
    """(x, version, lowest clock; inf when none was live) of a reply to a shard of `size`."""
    version, clock = reply[size:].clone().view(torch.float64).tolist()
    return reply[:size], int(version), clock if clock >= 0 else math.inf


def send_service_reply(comm: Comm, dst: int, value: Any) -> None:
    """`value` (plain data, tensors on any device) as its length, then its bytes."""
    blob = checkpoint_wire.to_bytes(walk.capture(value))
    comm.send(torch.tensor([float(blob.numel())], dtype=torch.float64), dst)
    comm.send(blob, dst)


def recv_service_reply(comm: Comm, src: int) -> Any:
    size = torch.empty(1, dtype=torch.float64)
    comm.recv(size, src=src)
    blob = torch.empty(int(size), dtype=torch.uint8)
    comm.recv(blob, src=src)
    return checkpoint_wire.from_bytes(blob)
