"""THE training loop: one worker's life, the same on every backend.

Read it top to bottom in `worker_loop`: build the model and the shard, wrap the optimizer in
`DistributedOptimizer`, then step, charging the compute time to the communicator (virtual time in
the simulator, nothing on real hardware) and publishing the state every ``eval_every`` steps to an
observer that evaluates the consensus model without disturbing the run.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from distsgd import algorithms, data, models
from distsgd.algorithms.base import Algorithm, WorkerContext
from distsgd.comm.base import Comm
from distsgd.errors import DivergenceError, UsageError, check_range, check_type
from distsgd.optimizer import DistributedOptimizer, serve, split_roles

BACKENDS = ("sim", "processes", "torchrun")
SAMPLINGS = ("shard", "iid")
DIVERGENCE = ("stop", "skip")


@dataclass(frozen=True)
class RunConfig:
    """One training job. Every field is a command-line flag of `distsgd train`."""

    algorithm: str = "allreduce"
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # typed, or text from --set
    workers: int = 4
    backend: str = "sim"  # sim: simulated workers in this process; processes: one per worker
    dataset: str = "digits"
    model: str | None = None  # None: the dataset's default (cnn for images, mlp otherwise)
    steps: int | None = None  # steps per worker; None: from epochs
    epochs: float | None = None  # passes over the training set by all workers together
    batch_size: int = 32  # per worker
    lr: float | None = None  # None: the algorithm's default (0.05 for most; `distsgd list`)
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int | None = None  # None: about ten evaluations per run
    sampling: str = "shard"  # shard: disjoint shards; iid: each worker samples the whole set
    compute_time: str = "flops"  # flops[:RATE], measured, or fixed seconds per step
    stragglers: tuple[tuple[int, float], ...] = ()  # (worker index, slowdown factor) pairs
    slowdown: str = "none"  # random per-step slowdown of every worker: none | lognormal:SIGMA
    on_divergence: str = "stop"  # a non-finite loss: stop the run, or skip that update
    latency: float = 25e-6  # simulated network, seconds
    bandwidth: float = 1.25e9  # simulated network, bytes per second
    links: tuple[tuple[int, int, float, float], ...] = ()  # (rank, rank, latency, bandwidth)
    timeout: float = 120.0  # seconds any blocking operation may wait on real processes
    out: str | None = None  # run folder; None: runs/<timestamp>-<algorithm>
    data_dir: str | None = None  # dataset cache; None: $DISTSGD_DATA or ~/.cache/distsgd
    progress: bool = False  # a progress bar on stderr

    DEFAULT_EPOCHS = 30.0

    @classmethod
    def create(cls, **options: Any) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            valid = ", ".join(sorted(names))
            raise UsageError(f"unknown option {unknown[0]!r}; valid options: {valid}")
        for key in ("stragglers", "links"):  # JSON and TOML give lists
            if isinstance(options.get(key), list):
                options[key] = tuple(tuple(item) if isinstance(item, list) else item
                                     for item in options[key])
        cfg = cls(**options)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Validate every field up front, naming the bad one and its valid values."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), hints[f.name])
        algorithms.get(self.algorithm)
        check_range("workers", self.workers, 1)
        _choice("backend", self.backend, BACKENDS)
        _choice("dataset", self.dataset, data.DATASETS)
        if self.model is not None:
            _choice("model", self.model, models.MODELS)
        if self.steps is not None and self.epochs is not None:
            raise UsageError("give either steps or epochs, not both")
        if self.steps is not None:
            check_range("steps", self.steps, 1)
        if self.epochs is not None:
            check_range("epochs", self.epochs, 0, low_open=True)
        check_range("batch_size", self.batch_size, 1)
        if self.lr is not None:
            check_range("lr", self.lr, 0)
        check_range("momentum", self.momentum, 0, 1, high_open=True)
        check_range("weight_decay", self.weight_decay, 0)
        if self.eval_every is not None:
            check_range("eval_every", self.eval_every, 1)
        _choice("sampling", self.sampling, SAMPLINGS)
        _choice("on_divergence", self.on_divergence, DIVERGENCE)
        ComputeModel.parse(self.compute_time)
        for index, factor in self.stragglers:
            check_range("straggler rank", index, 0, self.workers - 1)
            check_range("straggler factor", factor, 0, low_open=True)
        Slowdown.parse(self.slowdown)
        check_range("latency", self.latency, 0)
        check_range("bandwidth", self.bandwidth, 0, low_open=True)
        check_range("timeout", self.timeout, 0, low_open=True)
        world = self.world_size()
        for a, b, latency, bandwidth in self.links:
            check_range("link rank", a, 0, world - 1)
            check_range("link rank", b, 0, world - 1)
            check_range("link latency", latency, 0)
            check_range("link bandwidth", bandwidth, 0, low_open=True)
        # Checks that need the run (e.g. crossover's groups against the workers) fail here,
        # before any data is loaded or process started; warnings are printed when it starts.
        self.make_algorithm().validate(self.workers, self.learning_rate)

    def make_algorithm(self) -> Algorithm:
        typed = {k: v for k, v in self.hyperparameters.items() if not isinstance(v, str)}
        text = {k: v for k, v in self.hyperparameters.items() if isinstance(v, str)}
        return algorithms.create(self.algorithm, text, **typed)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else self.make_algorithm().default_lr()

    @property
    def model_name(self) -> str:
        return self.model or models.default_model(self.dataset)

    def world_size(self) -> int:
        algorithm = self.make_algorithm()
        return self.workers + algorithm.servers(self.workers)

    def total_steps(self, dataset: data.Dataset) -> int:
        if self.steps is not None:
            return self.steps
        epochs = self.epochs if self.epochs is not None else self.DEFAULT_EPOCHS
        # Enough steps for all workers together to see `epochs` times the training set (rounding
        # whole passes per step first would overshoot: 30 epochs of digits would be 32).
        samples = epochs * len(dataset.y_train)
        return max(1, math.ceil(samples / (self.workers * self.batch_size)))

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["hyperparameters"] = dataclasses.asdict(self.make_algorithm())
        out["lr"] = self.learning_rate
        return out


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UsageError(f"unknown {name} {value!r}; valid choices: {', '.join(valid)}")


@dataclass(frozen=True)
class ComputeModel:
    """How long one step's computation takes in virtual time.

    flops: 3 × forward FLOPs × batch / rate (backward ≈ 2 × forward), deterministic, the default
    because it keeps simulated runs reproducible; measured: the real forward/backward/step time of
    that worker; fixed: the same number of seconds for every step.
    """

    mode: str
    value: float = 0.0

    DEFAULT_RATE = 1e10  # FLOP/s: about one CPU core

    @classmethod
    def parse(cls, text: str) -> ComputeModel:
        head, _, tail = text.partition(":")
        try:
            if head == "flops":
                rate = float(tail) if tail else cls.DEFAULT_RATE
                check_range("compute_time flops rate", rate, 0, low_open=True)
                return cls("flops", rate)
            if head == "measured" and not tail:
                return cls("measured")
            seconds = float(text)
        except ValueError:
            seconds = -1.0
        if seconds < 0 or math.isnan(seconds):
            raise UsageError(f"compute_time={text!r} is not valid; valid values: 'flops', "
                             "'flops:RATE' (FLOP/s), 'measured', or seconds per step (>= 0)")
        return cls("fixed", seconds)

    def step_seconds(self, flops_per_sample: int, batch: int, measured: float) -> float:
        if self.mode == "flops":
            return 3.0 * flops_per_sample * batch / self.value
        if self.mode == "measured":
            return measured
        return self.value


@dataclass(frozen=True)
class Slowdown:
    """Seeded random slowdown of each step: a factor exp(N(0, σ²)) (none: 1)."""

    sigma: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Slowdown:
        head, _, tail = text.partition(":")
        if head == "none" and not tail:
            return cls()
        try:
            sigma = float(tail) if head == "lognormal" else -1.0
        except ValueError:
            sigma = -1.0
        if not sigma >= 0:
            raise UsageError(f"slowdown={text!r} is not valid; valid values: 'none' or "
                             "'lognormal:SIGMA' with SIGMA >= 0")
        return cls(sigma)

    def factors(self, seed: int, worker: int) -> Iterator[float]:
        rng = np.random.default_rng([seed, 0x5104, worker])
        while True:
            yield float(np.exp(self.sigma * rng.standard_normal())) if self.sigma else 1.0


@dataclass
class Contribution:
    """What one worker publishes at an evaluation point."""

    params: torch.Tensor  # its model (for the consensus distance)
    evaluated: torch.Tensor  # its share of the evaluated model
    weight: float
    loss_sum: float
    loss_count: int
    bytes_sent: int
    clock: float | None
    extra: dict[str, Any] = field(default_factory=dict)  # the algorithm's own figures


class Observer(Protocol):
    """How long a worker trains and when its state is evaluated (see `distsgd.evaluation`)."""

    def begin(self, ctx: WorkerContext, snapshot: Callable[[], Contribution]) -> None: ...

    def take(self, ctx: WorkerContext, done: int) -> bool: ...

    def stepped(self, ctx: WorkerContext, done: int,
                snapshot: Callable[[], Contribution]) -> None: ...


@dataclass
class WorkerResult:
    rank: int
    steps: int
    state: torch.Tensor  # the final flat model of this worker
    bytes_by_verb: dict[str, int]
    virtual_time_s: float | None
    figures: dict[str, Any] = field(default_factory=dict)  # a server's final figures


def eval_steps(cfg: RunConfig, total: int) -> set[int]:
    every = cfg.eval_every or max(1, total // 10)
    return {0, total, *range(every, total, every)}


def worker_loop(comm: Comm, cfg: RunConfig, dataset: data.Dataset, observer: Observer,
                on_step: Callable[[int], None] | None = None) -> WorkerResult:
    """One rank's run: a training worker, or a server of a parameter-server algorithm."""
    algorithm = cfg.make_algorithm()
    servers, workers = split_roles(algorithm, comm.world_size)
    torch.manual_seed(cfg.seed)  # every rank builds the same initial model
    model = models.build(cfg.model_name, dataset.input_shape, dataset.num_classes)
    if comm.rank in servers:
        figures = serve(model, algorithm, lr=cfg.learning_rate, comm=comm, seed=cfg.seed)
        return WorkerResult(comm.rank, 0, torch.empty(0), comm.bytes_by_verb, comm.now(), figures)
    index = workers.index(comm.rank)
    momentum = cfg.momentum if algorithm.local_momentum() else 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=momentum,
                                weight_decay=cfg.weight_decay)
    opt = DistributedOptimizer(model, optimizer, algorithm, comm=comm, seed=cfg.seed)
    batches = data.batches(dataset, index, len(workers), cfg.batch_size, cfg.seed, cfg.sampling)
    compute = ComputeModel.parse(cfg.compute_time)
    straggle = dict(cfg.stragglers).get(index, 1.0)
    jitter = Slowdown.parse(cfg.slowdown).factors(cfg.seed, index)
    flops = models.forward_flops(model, dataset.input_shape)
    loss_sum, loss_count = 0.0, 0

    def snapshot() -> Contribution:
        params = opt.ctx.flat.get()
        if not torch.isfinite(params).all():  # never write a NaN model into the results
            raise DivergenceError(f"worker {index} diverged: its model holds non-finite values "
                                  f"after step {opt.ctx.step}")
        vector, weight = algorithm.evaluated(opt.ctx, opt.state)
        extra = algorithm.metrics(opt.ctx, opt.state) if index == 0 else {}
        return Contribution(params, vector, weight, loss_sum, loss_count,
                            comm.bytes_sent, comm.now(), extra)

    observer.begin(opt.ctx, snapshot)
    model.train()
    step = 0
    while observer.take(opt.ctx, step):
        step += 1
        x, y = next(batches)
        started = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        elif cfg.on_divergence == "stop":
            raise DivergenceError(f"worker {index} diverged: loss {loss.item()} at step {step} "
                                  "(lower --lr, or --on-divergence skip)")
        # else: skip this update. The gradient stays zero, but the step still runs, so the
        # algorithm's messages and collectives happen and no other worker waits for this one.
        measured = time.perf_counter() - started
        slow = straggle * next(jitter)
        comm.elapse(slow * compute.step_seconds(flops, len(y), measured))
        if comm.now() is None and slow > 1.0:
            time.sleep((slow - 1.0) * measured)  # real processes: stragglers really wait
        opt.step()
        opt.zero_grad()
        if finite:
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        if on_step is not None:
            on_step(step)
        observer.stepped(opt.ctx, step, snapshot)
    opt.finish()
    return WorkerResult(comm.rank, step, opt.ctx.flat.get(), comm.bytes_by_verb, comm.now())
