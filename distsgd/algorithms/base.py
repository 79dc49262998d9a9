"""The `Algorithm` contract: a frozen config whose methods fill the training loop's hooks.

An algorithm is a frozen dataclass; its fields are its hyperparameters with the papers' names
(declared with `hyperparameter`, which records the meaning and the valid range). Per-worker mutable
state lives in the object `init` returns; in the simulator every worker shares one config object.
The hooks run on every worker, in this order, once per step::

    loss.backward()
    algorithm.after_backward(ctx, state)   # e.g. average gradients
    optimizer.step()
    algorithm.after_step(ctx, state)       # e.g. mix parameters with peers
    ctx.step += 1

Algorithms talk to the network only through ``ctx.comm``, never to the torch backend itself.
Server ranks run `serve` instead of the training loop: `servers` says how many the algorithm
wants, and they take the first global ranks.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from distsgd import checkpoint
from distsgd.comm.base import Comm, Group
from distsgd.errors import UsageError, check_range, check_type
from distsgd.flat import FlatState


def hyperparameter(default: Any, help: str, *, low: float | None = None,
                   high: float | None = None, low_open: bool = False, high_open: bool = False,
                   choices: tuple[Any, ...] | None = None) -> Any:
    """A config field with its meaning and valid range, checked when the config is built."""
    return field(default=default, metadata={
        "help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
        "choices": choices})


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


@dataclass(frozen=True)
class Algorithm:
    """Base class of every algorithm; subclasses are frozen dataclasses registered by name."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    synchronous: ClassVar[bool] = True
    sends: ClassVar[str] = ""  # what one worker sends per step, for `distsgd list` and the README

    def __post_init__(self) -> None:
        check_fields(self)

    # ---------------------------------------------------------------- roles and checks
    def servers(self, workers: int) -> int:
        """How many server ranks this algorithm needs next to `workers` workers."""
        return 0

    def default_lr(self) -> float:
        """The learning rate a run uses when none is given (momentum at a server multiplies the
        effective step by 1/(1 − μ), so such algorithms default to a smaller one)."""
        return 0.05

    def local_momentum(self) -> bool:
        """False when the algorithm applies momentum of its own (EAMSGD's δ, a server's μ): the
        training loop then gives the workers plain SGD, whatever --momentum says."""
        return True

    def validate(self, workers: int, lr: float) -> list[str]:
        """Checks that depend on the run; raise `UsageError`, or return warnings to print."""
        return []

    # --------------------------------------------------------------------------- hooks
    def init(self, ctx: WorkerContext) -> Any:
        """Per-worker state; called once on every worker after the models are made identical."""
        return None

    def after_backward(self, ctx: WorkerContext, state: Any) -> None:
        """Gradients are in ``p.grad``; the local optimizer step comes next."""

    def after_step(self, ctx: WorkerContext, state: Any) -> None:
        """The local optimizer step has been applied."""

    def finish(self, ctx: WorkerContext, state: Any) -> None:
        """The worker has taken its last step (a parameter-server client says goodbye here)."""

    def metrics(self, ctx: WorkerContext, state: Any) -> dict[str, Any]:
        """Extra figures for the metrics line, asked of worker 0 after `evaluated`."""
        return {}

    def evaluated(self, ctx: WorkerContext, state: Any) -> tuple[torch.Tensor, float]:
        """This worker's share of the evaluated model: (flat vector, weight).

        The evaluated model is the weighted average of every worker's vector; the default is the
        plain average of the workers' models. Elastic averaging returns the center variable.
        """
        return ctx.flat.get(), 1.0

    def serve(self, ctx: WorkerContext, saved: Any = None) -> dict[str, Any]:
        """The server role's loop, for algorithms whose `servers` is positive; runs until every
        worker has finished and returns the server's final figures. `saved`: this server's state
        from a checkpoint, to start from instead of the model."""
        raise NotImplementedError(f"{self.name} has no server role")

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self, ctx: WorkerContext, state: Any) -> Any:
        """This worker's algorithm state as plain data (docs/checkpoints.md). The default walks
        the state object: dataclasses, tensors, numbers, containers, numpy generators."""
        return checkpoint.capture(state)

    def load_state_dict(self, ctx: WorkerContext, state: Any, saved: Any) -> Any:
        """Put `saved` (from `state_dict`) back into `state`, made by `init`; returns the state."""
        return checkpoint.restore(state, saved)

    def server_state_dicts(self, ctx: WorkerContext, state: Any) -> list[Any]:
        """Every server's state, fetched by worker 0 at a checkpoint (none: no server role)."""
        return []


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


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(config: Algorithm) -> None:
    """Raise `UsageError` naming the first hyperparameter outside its declared range."""
    hints = type_hints(type(config))
    for f in dataclasses.fields(config):
        meta, value = f.metadata, getattr(config, f.name)
        where = f"{config.name}: {f.name}"
        check_type(where, value, hints[f.name])
        if not meta or value is None:
            continue
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise UsageError(f"{where}={value!r} is not a valid choice; valid choices: "
                             f"{', '.join(map(str, meta['choices']))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            check_range(where, value, meta.get("low"), meta.get("high"),
                        low_open=meta["low_open"], high_open=meta["high_open"],
                        meaning=meta["help"])
