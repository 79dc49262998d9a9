"""`DistributedOptimizer`: a user's model and torch optimizer, trained by a distributed algorithm.

    opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       algorithm=distsgd.SGP())
    loader = DataLoader(dataset, batch_size=32, sampler=opt.sampler(dataset))  # workers only
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=100)  # a torch optimizer
    for x, y in loader:
        loss_fn(model(x), y).backward()
        opt.step()              # after_backward hook, local step, after_step hook
        opt.zero_grad()
        scheduler.step()
    model_for_eval = opt.consensus_model()   # collective: every worker calls it
    opt.finish()                             # last: servers wait for it; closes what it opened

The communicator comes from the run (the simulator or the process launcher sets one per worker),
else from torchrun's environment or the user's own process group, else it is a world of one:
one worker, no server, where the parameter-server algorithms are plain SGD (README, Python API).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Subset

from distsgd import algorithms, checkpoint
from distsgd.algorithms.allreduce import AllReduce
from distsgd.algorithms.base import Algorithm, WorkerContext
from distsgd.comm import environment
from distsgd.comm.base import Comm, current, set_current
from distsgd.comm.local import LocalComm
from distsgd.errors import UsageError
from distsgd.roles import Roles

T = TypeVar("T")

_built: list[Comm] = []  # the communicator default_comm() built from torchrun's environment


def default_comm() -> Comm:
    """The run's communicator: the one the runtime set, else one built (once) from torchrun's
    environment, else a world of one."""
    comm = current()
    if comm is not None:
        return comm
    built = environment.from_environment()  # the torch backend loads here, only if needed
    if built is None:
        return LocalComm()
    _built.append(built)
    set_current(built)
    return built


def release(comm: Comm) -> None:
    """Close a communicator default_comm() built (collective: every rank gets here)."""
    if comm in _built:
        _built.remove(comm)
        set_current(None)
        environment.shutdown(comm)


def is_server(algorithm: Algorithm | str, comm: Comm | None = None) -> bool:
    """Whether this rank is one of the algorithm's parameter servers (the first ranks); never in
    a world of one, which has no server."""
    algorithm = algorithms.create(algorithm) if isinstance(algorithm, str) else algorithm
    comm = comm or default_comm()
    return world_roles(algorithm, comm).is_server(comm.rank)


def world_roles(algorithm: Algorithm, comm: Comm) -> Roles:
    """The roles of the communicator's world. A world of one is one worker and no server: a
    parameter-server algorithm then runs as plain SGD (`DistributedOptimizer`)."""
    if comm.world_size == 1:
        return Roles((), (0,))
    return Roles.of_world(algorithm, comm.world_size)


def serve(model: nn.Module, algorithm: Algorithm | str, *, lr: float,
          comm: Comm | None = None, seed: int = 0, saved: Any = None) -> dict[str, Any]:
    """Run a parameter server until every worker is done; returns its figures (staleness).

    ``model`` gives the shapes and the initial x̃ (build it as the workers do); ``lr`` is what a
    server that applies the learning rate itself (async-sparse) uses, fixed for the run (a
    scheduler on the workers' optimizer does not reach it); ``saved`` is this server's state
    from a checkpoint (a resumed run).

        if distsgd.is_server(algorithm):
            distsgd.serve(model, algorithm, lr=0.05)
        else:
            ... the training loop with DistributedOptimizer ...
    """
    algorithm = algorithms.create(algorithm) if isinstance(algorithm, str) else algorithm
    comm = comm or default_comm()
    roles = world_roles(algorithm, comm)
    if not roles.is_server(comm.rank):
        raise ValueError(f"rank {comm.rank} is a worker of {algorithm.name}, not a server "
                         "(a world of one has no server); valid: call serve where "
                         "distsgd.is_server(algorithm) is true")
    ctx = WorkerContext(comm, model, None, roles.workers, roles.servers, seed=seed, lr=lr)
    figures = algorithm.serve(ctx) if saved is None else algorithm.serve(ctx, saved)
    release(comm)
    return figures


def sampler(dataset: Dataset[T] | Sequence[T], algorithm: Algorithm | str, *,
            comm: Comm | None = None, shuffle: bool = True, seed: int = 0,
            drop_last: bool = False) -> DistributedSampler[T]:
    """A `DistributedSampler` over the training workers only: num_replicas = the workers,
    rank = this worker's index among them (servers hold no data). Call ``set_epoch(epoch)`` on
    it before each epoch, as with any DistributedSampler.

        loader = DataLoader(dataset, batch_size=32, sampler=distsgd.sampler(dataset, "ssp"))
    """
    algorithm = algorithms.create(algorithm) if isinstance(algorithm, str) else algorithm
    comm = comm or default_comm()
    roles = world_roles(algorithm, comm)
    if roles.is_server(comm.rank):
        raise ValueError(f"rank {comm.rank} is a server of {algorithm.name}: servers hold no "
                         "data; valid: call sampler where distsgd.is_server(algorithm) is false")
    # Any sized, indexable collection will do, as for torch's own samplers.
    return DistributedSampler(dataset, num_replicas=len(roles.workers),  # type: ignore[arg-type]
                              rank=roles.index(comm.rank), shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


class DistributedOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose `step` runs the algorithm's hooks around ``optimizer``'s step.

    It shares the wrapped optimizer's `param_groups`, `state` and `defaults` (the same objects,
    each parameter registered once), so whatever sets a group's ``lr`` (any
    ``torch.optim.lr_scheduler``, or the user's own code) sets the rate of the local step. The
    algorithm's per-worker state is `algorithm_state`. In a world of one a parameter-server
    algorithm runs as plain SGD (`algorithm` is then `AllReduce()`, which has no peer).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer,
        algorithm: Algorithm | str = "allreduce", *, comm: Comm | None = None, seed: int = 0,
        sync_init: bool = True,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: {type(optimizer).__name__} is not a torch.optim."
                            "Optimizer; valid: e.g. torch.optim.SGD(model.parameters())")
        # torch's own set-up (step hooks, profiler names) runs on copies of the groups; then the
        # wrapped optimizer's objects take their place, so that a change to a group (a
        # scheduler's lr) is a change to the step that runs.
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self.optimizer = optimizer
        self.algorithm = algorithms.create(algorithm) if isinstance(algorithm, str) else algorithm
        comm = comm or default_comm()
        if comm.world_size == 1 and self.algorithm.servers(1):
            self.algorithm = AllReduce()  # no server to talk to: plain SGD, as promised
        roles = world_roles(self.algorithm, comm)
        if roles.is_server(comm.rank):
            raise ValueError(f"rank {comm.rank} is a server of {self.algorithm.name}; servers run "
                             "the algorithm's serve loop, not an optimizer")
        self.ctx = WorkerContext(comm, model, optimizer, roles.workers, roles.servers, seed=seed)
        if sync_init and len(roles.workers) > 1:
            # Like DDP: every worker starts from worker 0's model, whatever each one initialised.
            x = self.ctx.flat.get()
            comm.broadcast_(x, roles.workers[0], group=self.ctx.workers_group)
            self.ctx.flat.set_(x)
        self.algorithm_state: Any = self.algorithm.init(self.ctx)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "ctx"):  # after __init__: the algorithm's flat buffer is fixed
            raise UsageError("add_param_group: the parameters are fixed when DistributedOptimizer "
                             "is made; valid: add the group to the wrapped optimizer first")
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One training step: `closure` (if given: it recomputes the loss and its gradients),
        the algorithm's after_backward hook, the wrapped optimizer's step, its after_step hook."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.algorithm.after_backward(self.ctx, self.algorithm_state)
        self.optimizer.step()
        self.algorithm.after_step(self.ctx, self.algorithm_state)
        self.ctx.step += 1
        return loss

    def finish(self) -> None:
        """Tell the algorithm this worker is done (parameter servers wait for every worker's
        goodbye); the last call of a run. It closes what distsgd opened (a communicator it
        built from torchrun's environment, and the process group if distsgd initialised it);
        a process group the user initialised stays theirs."""
        self.algorithm.finish(self.ctx, self.algorithm_state)
        release(self.ctx.comm)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients in place by default, so they stay views of the flat buffer that
        algorithms communicate (set_to_none=True works too, at the cost of one copy a step)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def shard(self, dataset: Dataset[T] | Sequence[T]) -> Subset[T]:
        """This worker's share of `dataset`: every `workers`-th item from its index among the
        training workers (servers hold none). Disjoint across workers, covering, sizes within
        one; `sampler` is the shuffling alternative."""
        return Subset(dataset, range(self.ctx.index, len(dataset), self.ctx.workers))  # type: ignore[arg-type]

    def sampler(self, dataset: Dataset[T] | Sequence[T], *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> DistributedSampler[T]:
        """A `DistributedSampler` over the training workers (see `distsgd.sampler`)."""
        return sampler(dataset, self.algorithm, comm=self.ctx.comm, shuffle=shuffle, seed=seed,
                       drop_last=drop_last)

    def state_dict(self) -> dict[str, Any]:
        """This worker's model (parameters and every buffer), optimizer state (momentum), step
        and algorithm state, as plain data (docs/checkpoints.md)."""
        return {"model": {k: v.detach().cpu().clone()
                          for k, v in self.ctx.model.state_dict().items()},
                "optimizer": checkpoint.capture(self.optimizer.state_dict()),
                "step": self.ctx.step,
                "algorithm": self.algorithm.state_dict(self.ctx, self.algorithm_state)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Continue from `state_dict`'s output (after `__init__`, i.e. after the algorithm's init
        has made its groups and connected to its servers). torch's load makes the wrapped
        optimizer's groups and state anew: they are shared again, so that a scheduler made
        before the load still sets the rate of the step that runs."""
        self.ctx.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.param_groups = self.optimizer.param_groups  # torch rebuilds both on load
        self.state = self.optimizer.state
        self.ctx.step = saved["step"]
        self.algorithm_state = self.algorithm.load_state_dict(self.ctx, self.algorithm_state,
                                                              saved["algorithm"])

    def consensus_state(self) -> torch.Tensor:
        """The flat state of the evaluated model (collective over the workers, not counted)."""
        vector, weight = self.algorithm.evaluated(self.ctx, self.algorithm_state)
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



