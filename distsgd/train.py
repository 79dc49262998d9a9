"""THE training loop: one worker's life, the same on every backend.

Read it top to bottom in `worker_loop`: build the model, serve it (a parameter server's rank) or
wrap the optimizer in `DistributedOptimizer`, then step, charging the compute time to the
communicator (virtual time in the simulator, nothing on real hardware) and publishing the state
every ``eval_every`` steps to an observer that evaluates the consensus model without disturbing
the run. A training worker's state across its steps is one `_Worker`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distsgd import data, models
from distsgd.algorithms.base import Algorithm
from distsgd.comm.base import Comm
from distsgd.comm.sim.compute import ComputeModel, Jitter, Slowdown
from distsgd.config import RunConfig, worker_device
from distsgd.errors import DivergenceError
from distsgd.observer import Contribution, Observer
from distsgd.optimizer import DistributedOptimizer, serve
from distsgd.roles import Roles


@dataclass
class WorkerResult:
    rank: int
    steps: int
    state: torch.Tensor  # the final flat model of this worker
    bytes_by_verb: dict[str, int]
    virtual_time_s: float | None
    figures: dict[str, Any] = field(default_factory=dict)  # a server's final figures


def worker_loop(comm: Comm, cfg: RunConfig, dataset: data.Dataset, observer: Observer,
                on_step: Callable[[int], None] | None = None,
                resume: dict[str, Any] | None = None) -> WorkerResult:
    """One rank's run: a training worker, or a server of a parameter-server algorithm.

    `resume`: a checkpoint (`distsgd.checkpoint`) to continue from instead of the start.
    """
    algorithm = cfg.make_algorithm()
    roles = Roles.of_world(algorithm, comm.world_size)
    model, rng = _initial_model(cfg, dataset)
    if roles.is_server(comm.rank):
        return _serve(comm, cfg, algorithm, model, resume)
    worker = _Worker.start(comm, cfg, algorithm, roles.index(comm.rank), model, rng, dataset)
    if resume is not None:
        worker.restore(resume["workers"][worker.index])
    ctx = worker.opt.ctx
    # The data position is the number of batches taken: one a step.
    batches = data.batches(dataset, worker.index, len(roles.workers), cfg.batch_size, cfg.seed,
                           cfg.sampling, start=ctx.step)
    observer.begin(ctx, worker.snapshot, worker.capture)
    model.train()
    step = ctx.step
    while observer.take(ctx, step):
        step += 1
        x, y = next(batches)
        worker.step(x, y, step)
        if on_step is not None:
            on_step(step)
        observer.stepped(ctx, step, worker.snapshot)
    worker.opt.finish()
    return WorkerResult(comm.rank, step, ctx.flat.get().cpu(), comm.bytes_by_verb, comm.now())


def _initial_model(cfg: RunConfig, dataset: data.Dataset) -> tuple[nn.Module, torch.Tensor]:
    """The run's initial model, the same on every rank (built on the CPU from the run's seed, then
    moved to the worker's device), and the torch RNG state right after it: the seed of this
    worker's own generator."""
    torch.manual_seed(cfg.seed)
    device = worker_device(cfg.device)
    model = models.build(cfg.model_name, dataset.input_shape, dataset.num_classes).to(device)
    return model, torch.get_rng_state()


def _serve(comm: Comm, cfg: RunConfig, algorithm: Algorithm, model: nn.Module,
           resume: dict[str, Any] | None) -> WorkerResult:
    """A parameter server's whole run: serve until every worker has said goodbye."""
    saved = resume["servers"][comm.rank] if resume is not None else None
    figures = serve(model, algorithm, lr=cfg.learning_rate, comm=comm, seed=cfg.seed, saved=saved)
    return WorkerResult(comm.rank, 0, torch.empty(0), comm.bytes_by_verb, comm.now(), figures)


@dataclass
class _Worker:
    """One training worker's state across its steps: with `opt`, all that a checkpoint keeps."""

    comm: Comm
    cfg: RunConfig
    index: int  # among the training workers
    device: torch.device
    model: nn.Module
    opt: DistributedOptimizer
    rng: torch.Tensor  # this worker's torch generator state (dropout), see `_own_rng`
    compute: ComputeModel
    flops: int  # of one sample's forward pass
    straggle: float  # this worker's fixed slowdown factor (--straggler)
    jitter: Jitter  # its random per-step slowdown factors (--slowdown)
    loss_sum: float = 0.0
    loss_count: int = 0

    @classmethod
    def start(cls, comm: Comm, cfg: RunConfig, algorithm: Algorithm, index: int,
              model: nn.Module, rng: torch.Tensor, dataset: data.Dataset) -> _Worker:
        momentum = cfg.momentum if algorithm.local_momentum() else 0.0
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=momentum,
                                    weight_decay=cfg.weight_decay)
        opt = DistributedOptimizer(model, optimizer, algorithm, comm=comm, seed=cfg.seed)
        return cls(comm, cfg, index, worker_device(cfg.device), model, opt, rng,
                   ComputeModel.parse(cfg.compute_time).on_cores(cfg.world_size(), cfg.cores),
                   models.forward_flops(model, dataset.input_shape),
                   dict(cfg.stragglers).get(index, 1.0),
                   Slowdown.parse(cfg.slowdown).factors(cfg.seed, index))

    def restore(self, saved: dict[str, Any]) -> None:
        """Go on from `capture`'s output (a resumed run)."""
        self.opt.load_state_dict(saved)  # model, optimizer (momentum), step, algorithm state
        self.jitter.rng.bit_generator.state = saved["jitter"]
        self.rng, self.loss_sum, self.loss_count = (saved["torch_rng"], saved["loss_sum"],
                                                    saved["loss_count"])
        if self.comm.now() is None:  # real processes: counting goes on from the checkpoint's bytes
            self.comm.restore_counts(saved["bytes_by_verb"])  # (the simulator restores its own)

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        """Step `step`: the gradient of one batch, its compute time charged, the update."""
        x, y = x.to(self.device), y.to(self.device)
        started = time.perf_counter()
        with self._own_rng():
            loss = F.cross_entropy(self.model(x), y)
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
        if not finite:
            self._diverged(loss, step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # measured: the kernels' time, not their launch's
        self._charge(time.perf_counter() - started, len(y))
        self.opt.step()
        self.opt.zero_grad()
        if finite:
            self.loss_sum, self.loss_count = self.loss_sum + loss.item(), self.loss_count + 1

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        """This worker's own torch generator, swapped in around its forward and backward:
        simulated workers share one process, and their draws must not depend on the schedule."""
        shared = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            torch.set_rng_state(shared)

    def _diverged(self, loss: torch.Tensor, step: int) -> None:
        """A non-finite loss: stop the run, or (--on-divergence skip) skip the update. The
        gradient then stays zero, but the step still runs, so the algorithm's messages and
        collectives happen and nobody waits."""
        if self.cfg.on_divergence == "stop":
            raise DivergenceError(f"worker {self.index} diverged: loss {loss.item()} at step "
                                  f"{step} (lower --lr, or --on-divergence skip)")

    def _charge(self, measured: float, batch: int) -> None:
        """Charge the step's compute time to the clock, slowed down for a straggler; on real
        processes (no virtual clock) a straggler really waits."""
        slow = self.straggle * next(self.jitter)
        self.comm.elapse(slow * self.compute.step_seconds(self.flops, batch, measured))
        if self.comm.now() is None and slow > 1.0:
            time.sleep((slow - 1.0) * measured)

    def snapshot(self) -> Contribution:
        """What this worker publishes at an evaluation point (`Observer`)."""
        ctx, state = self.opt.ctx, self.opt.algorithm_state
        params = ctx.flat.get()
        if not torch.isfinite(params).all():  # never write a NaN model into the results
            raise DivergenceError(f"worker {self.index} diverged: its model holds non-finite "
                                  f"values after step {ctx.step}")
        vector, weight = self.opt.algorithm.evaluated(ctx, state)
        extra = self.opt.algorithm.metrics(ctx, state) if self.index == 0 else {}
        # Evaluation runs on the CPU (and its collectives on gloo) whatever the device.
        return Contribution(params.cpu(), vector.cpu(), weight, self.loss_sum, self.loss_count,
                            self.comm.bytes_sent, self.comm.now(), extra)

    def capture(self) -> dict[str, Any]:
        """Everything this worker needs to go on from here (at a checkpoint step)."""
        ctx, state = self.opt.ctx, self.opt.algorithm_state
        return {**self.opt.state_dict(), "jitter": self.jitter.rng.bit_generator.state,
                "torch_rng": self.rng.clone(), "loss_sum": self.loss_sum,
                "loss_count": self.loss_count, "bytes_by_verb": self.comm.bytes_by_verb,
                "clock": self.comm.now(),
                # Worker 0 also fetches the servers' shards (every worker is at the checkpoint).
                "servers": (self.opt.algorithm.server_state_dicts(ctx, state)
                            if self.index == 0 else [])}
