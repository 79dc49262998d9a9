"""`DistributedOptimizer`: a user's model and torch optimizer, trained by a distributed algorithm.

    opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       algorithm=distsgd.SGP())
    for x, y in loader:
        loss_fn(model(x), y).backward()
        opt.step()              # after_backward hook, local step, after_step hook
        opt.zero_grad()
    model_for_eval = opt.consensus_model()   # collective: every worker calls it
    opt.finish()                             # last: servers wait for it; closes torchrun's comm

The communicator comes from the run (the simulator or the process launcher sets one per worker),
else from torchrun's environment, else it is a world of one, where every algorithm is plain SGD.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from distsgd import algorithms, checkpoint
from distsgd.algorithms.base import Algorithm, WorkerContext
from distsgd.comm.base import Comm, current, set_current
from distsgd.comm.local import LocalComm

_built: list[Comm] = []  # the communicator default_comm() built from torchrun's environment


def default_comm() -> Comm:
    """The run's communicator: the one the runtime set, else one built (once) from torchrun's
    environment, else a world of one."""
    comm = current()
    if comm is not None:
        return comm
    from distsgd import launch  # torch.distributed is touched only when a real run asks for it

    built = launch.from_torchrun_env()
    if built is None:
        return LocalComm()
    _built.append(built)
    set_current(built)
    return built


def release(comm: Comm) -> None:
    """Close a communicator default_comm() built (collective: every rank gets here)."""
    if comm in _built:
        from distsgd import launch

        _built.remove(comm)
        set_current(None)
        launch.shutdown(comm)  # type: ignore[arg-type]


def split_roles(algorithm: Algorithm, world_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(server ranks, worker ranks): servers take the first ranks of the world."""
    for workers in range(world_size, 0, -1):
        servers = algorithm.servers(workers)
        if workers + servers == world_size:
            return tuple(range(servers)), tuple(range(servers, world_size))
    raise ValueError(f"{algorithm.name} cannot split a world of {world_size} ranks into "
                     "servers and workers")


def is_server(algorithm: Algorithm | str, comm: Comm | None = None) -> bool:
    """Whether this rank is one of the algorithm's parameter servers (the first ranks)."""
    algorithm = algorithms.create(algorithm) if isinstance(algorithm, str) else algorithm
    comm = comm or default_comm()
    return comm.rank in split_roles(algorithm, comm.world_size)[0]


def serve(model: nn.Module, algorithm: Algorithm | str, *, lr: float,
          comm: Comm | None = None, seed: int = 0, saved: Any = None) -> dict[str, Any]:
    """Run a parameter server until every worker is done; returns its figures (staleness).

    ``model`` gives the shapes and the initial x̃ (build it as the workers do); ``lr`` is what a
    server that applies the learning rate itself (async-sparse) uses; ``saved`` is this server's
    state from a checkpoint (a resumed run).

        if distsgd.is_server(algorithm):
            distsgd.serve(model, algorithm, lr=0.05)
        else:
            ... the training loop with DistributedOptimizer ...
    """
    algorithm = algorithms.create(algorithm) if isinstance(algorithm, str) else algorithm
    comm = comm or default_comm()
    servers, workers = split_roles(algorithm, comm.world_size)
    if comm.rank not in servers:
        raise ValueError(f"rank {comm.rank} is a worker of {algorithm.name}, not a server")
    ctx = WorkerContext(comm, model, None, workers, servers, seed=seed, lr=lr)
    figures = algorithm.serve(ctx) if saved is None else algorithm.serve(ctx, saved)
    release(comm)
    return figures


class DistributedOptimizer:
    """Wraps ``optimizer`` so that `step` runs the algorithm's hooks around the local step."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer,
        algorithm: Algorithm | str = "allreduce", *, comm: Comm | None = None, seed: int = 0,
        sync_init: bool = True,
    ) -> None:
        self.algorithm = algorithms.create(algorithm) if isinstance(algorithm, str) else algorithm
        self.optimizer = optimizer
        comm = comm or default_comm()
        servers, workers = split_roles(self.algorithm, comm.world_size)
        if comm.rank in servers:
            raise ValueError(f"rank {comm.rank} is a server of {self.algorithm.name}; servers run "
                             "the algorithm's serve loop, not an optimizer")
        self.ctx = WorkerContext(comm, model, optimizer, workers, servers, seed=seed)
        if sync_init and len(workers) > 1:
            # Like DDP: every worker starts from worker 0's model, whatever each one initialised.
            x = self.ctx.flat.get()
            comm.broadcast_(x, workers[0], group=self.ctx.workers_group)
            self.ctx.flat.set_(x)
        self.state: Any = self.algorithm.init(self.ctx)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def step(self) -> None:
        self.algorithm.after_backward(self.ctx, self.state)
        self.optimizer.step()
        self.algorithm.after_step(self.ctx, self.state)
        self.ctx.step += 1

    def finish(self) -> None:
        """Tell the algorithm this worker is done (parameter servers wait for every worker's
        goodbye); the last call of a run: a communicator built from torchrun's environment is
        closed here."""
        self.algorithm.finish(self.ctx, self.state)
        release(self.ctx.comm)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients in place by default, so they stay views of the flat buffer that
        algorithms communicate (set_to_none=True works too, at the cost of one copy a step)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """This worker's model (parameters and every buffer), optimizer state (momentum), step
        and algorithm state, as plain data (docs/checkpoints.md)."""
        return {"model": {k: v.detach().cpu().clone()
                          for k, v in self.ctx.model.state_dict().items()},
                "optimizer": checkpoint.capture(self.optimizer.state_dict()),
                "step": self.ctx.step,
                "algorithm": self.algorithm.state_dict(self.ctx, self.state)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Continue from `state_dict`'s output (after `__init__`, i.e. after the algorithm's init
        has made its groups and connected to its servers)."""
        self.ctx.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.ctx.step = saved["step"]
        self.state = self.algorithm.load_state_dict(self.ctx, self.state, saved["algorithm"])

    def consensus_state(self) -> torch.Tensor:
        """The flat state of the evaluated model (collective over the workers, not counted)."""
        vector, weight = self.algorithm.evaluated(self.ctx, self.state)
        message = torch.cat([vector.double() * weight,
                             torch.tensor([weight], dtype=torch.float64, device=vector.device)])
        with self.ctx.comm.uncounted():
            self.ctx.comm.all_reduce_(message, group=self.ctx.workers_group)
        return (message[:-1] / message[-1]).to(vector.dtype)

    def consensus_model(self) -> nn.Module:
        """A copy of the model holding the evaluated model: the workers' average, the center
        variable or the server's parameters, as the algorithm defines it. Collective."""
        model = copy.deepcopy(self.ctx.model)
        type(self.ctx.flat)(model).set_(self.consensus_state())
        return model

    def consensus_distance(self) -> float:
        """Mean over workers of ||x_i − x̄|| (collective over the workers, not counted)."""
        x = self.ctx.flat.get()
        mean = x.double().clone()
        with self.ctx.comm.uncounted():
            self.ctx.comm.all_reduce_(mean, group=self.ctx.workers_group)
            mean.div_(self.ctx.workers)
            dist = torch.linalg.vector_norm(x.double() - mean).reshape(1)
            self.ctx.comm.all_reduce_(dist, group=self.ctx.workers_group)
        return float(dist) / self.ctx.workers



