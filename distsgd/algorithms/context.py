"""What an algorithm's hooks see of their worker: `WorkerContext`, and the one helper every
all-reduce algorithm shares."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distsgd.comm.base import Comm, Group
from distsgd.flat import FlatState


@dataclass
class WorkerContext:
    """What a hook sees of its worker: the network, the model, and where it is in training."""

    comm: Comm
    model: nn.Module
    optimizer: torch.optim.Optimizer | None  # None on a server rank
    worker_ranks: tuple[int, ...]  # global ranks of the training workers, in order
    server_ranks: tuple[int, ...] = ()
    seed: int = 0  # shared by every worker: topologies draw from it without negotiation
    step: int = 0  # local steps completed before the current one
    lr: float = 0.0  # the run's learning rate, for servers that apply it themselves
    flat: FlatState = field(init=False)
    workers_group: Group = field(init=False)

    def __post_init__(self) -> None:
        self.flat = FlatState(self.model)
        self.workers_group = self.comm.new_group(self.worker_ranks)

    @property
    def rank(self) -> int:
        """This worker's global rank."""
        return self.comm.rank

    @property
    def index(self) -> int:
        """This worker's position among the training workers (0..workers-1); -1 on a server."""
        return self.worker_ranks.index(self.comm.rank) if self.is_worker else -1

    @property
    def is_worker(self) -> bool:
        return self.comm.rank in self.worker_ranks

    @property
    def workers(self) -> int:
        return len(self.worker_ranks)

    @property
    def nodes(self) -> tuple[int, ...]:
        """The machine of each global rank as the communicator knows it (torchrun's node, the
        simulator's host); all 0 (one machine) when it does not say."""
        nodes = getattr(self.comm, "nodes", None)
        return tuple(nodes) if nodes else (0,) * self.comm.world_size


def average_gradients_(ctx: WorkerContext, group: Group) -> None:
    """Replace gradients and float buffers by their exact mean over `group` (one all-reduce).

    Buffers (BatchNorm statistics) are not gradients, but they ride in the same message so that
    every member keeps an identical model.
    """
    flat = ctx.flat
    if not flat.buffers:  # the common case: reduce the live gradient buffer in place
        ctx.comm.all_reduce_(flat.grad_buffer(), group=group).div_(group.size)
        return
    message = torch.cat([flat.grad_buffer(), flat.buffer_values()])
    ctx.comm.all_reduce_(message, group=group).div_(group.size)
    flat.set_grads_(message[: flat.num_params])
    flat.set_buffers_(message[flat.num_params :])
