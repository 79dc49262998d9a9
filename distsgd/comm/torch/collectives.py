"""The collective verbs of TorchComm: all-reduce, broadcast, barrier and groups on gloo (CUDA
tensors on NCCL in a GPU run), each waited for with a timeout and counted by the conventions of
`distsgd.comm.base`.

gloo applies the group's timeout inside every collective, so a collective waits at most that
long and a per-call timeout can only shorten it; one that times out leaves gloo's own operation
running, so the communicator refuses further work afterwards (`TorchComm._failure`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distsgd.comm.base import (
    ByteCounter,
    Group,
    nbytes,
    ring_allreduce_bytes,
    tree_broadcast_children,
)
from distsgd.errors import CommTimeout, WorkerFailure, check_range

# Plain gloo, or torch's multi-backend group of a GPU run (`group.init_process_group` with
# device cuda): CPU tensors, hence the mailbox, on gloo; CUDA tensors' collectives on NCCL.
GLOO_BACKENDS = ("gloo", "cpu:gloo,cuda:nccl")


class Collectives:
    """The collective half of `TorchComm` (a mixin: it needs the attributes declared below)."""

    _rank: int
    _world_size: int
    _timeout: float
    _everyone: Group
    _counter: ByteCounter

    def _check_usable(self, verb: str) -> None:
        """Raise if the communicator may not be used (closed, broken, lost a peer)."""
        raise NotImplementedError

    def _failure(self, verb: str, peer: int | None, seconds: float,
                 error: RuntimeError) -> WorkerFailure | CommTimeout:
        """The error to raise for gloo's `error` (see `TorchComm._failure`)."""
        raise NotImplementedError

    def all_reduce_(self, tensor: torch.Tensor, group: Group | None = None,
                    timeout: float | None = None) -> torch.Tensor:
        ranks, handle = self._group(group, "all_reduce")
        buf = tensor if _direct(tensor) else cpu_copy(tensor)
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
        buf = tensor if _direct(tensor) else cpu_copy(tensor)
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


def _direct(tensor: torch.Tensor) -> bool:
    """Whether the group's backend can read and write `tensor` in place (else a staging copy
    on the CPU is used): gloo a CPU tensor, NCCL a CUDA one where the group has it."""
    if not tensor.is_contiguous():
        return False
    return tensor.device.type == "cpu" or (
        tensor.device.type == "cuda" and str(dist.get_backend()) == GLOO_BACKENDS[1])


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of `tensor` (what gloo sends, and a staging buffer)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor.detach())
