"""RunConfig: one training job, checked up front; what every entry point validates and passes on.

cli, compare, project, runtime and evaluation import this module, never the loop (`distsgd.train`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from distsgd import algorithms, data, models
from distsgd.algorithms.base import Algorithm
from distsgd.comm.sim.compute import ComputeModel, Slowdown
from distsgd.errors import UsageError, check_range, check_type, did_you_mean
from distsgd.roles import Roles

BACKENDS = ("sim", "processes", "torchrun")
SAMPLINGS = ("shard", "iid")
DIVERGENCE = ("stop", "skip")
ON_FAILURE = ("stop", "continue")
# Bounds of the numeric options: far beyond any sensible run, yet small enough that nothing the
# run derives from them (schedules, timedeltas, seeds, virtual clocks) overflows.
MAX_STEPS = 10**9  # steps per worker, and any period counted in steps
MAX_WORKERS = 4096
MAX_BATCH = 10**6
MAX_EPOCHS = 10**6
MAX_SECONDS = 10**6  # timeout and any simulated duration: a timedelta in ms fits a C int
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed, numpy a non-negative one
MAX_SIGMA = 10.0  # lognormal slowdown: exp(N(0, 10²)) already spans e^±30


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
    cores: int = 0  # simulator: cores all processes share, steps max(1, N/cores)× longer; 0: 1 each
    stragglers: tuple[tuple[int, float], ...] = ()  # (worker index, slowdown factor) pairs
    slowdown: str = "none"  # random per-step slowdown of every worker: none | lognormal:SIGMA
    on_divergence: str = "stop"  # a non-finite loss: stop the run, or skip that update
    on_failure: str = "stop"  # a worker process dies: stop the run, or continue without it
    latency: float = 25e-6  # simulated network, seconds
    bandwidth: float = 1.25e9  # simulated network, bytes per second
    links: tuple[tuple[int, int, float, float], ...] = ()  # (rank, rank, latency, bandwidth)
    timeout: float = 120.0  # seconds any blocking operation may wait on real processes
    out: str | None = None  # run folder; None: runs/<timestamp>-<algorithm>
    data_dir: str | None = None  # dataset cache; None: $DISTSGD_DATA or ~/.cache/distsgd
    progress: bool = False  # a progress bar on stderr
    checkpoint_every: int = 0  # steps between checkpoints in the run folder; 0: none
    stop_after: int | None = None  # stop right after the checkpoint at this step (to resume)
    device: str = "cpu"  # cpu, cuda (real processes: each its own GPU) or cuda:N (simulator)
    overwrite: bool = False  # replace the run already in `out` (else such an `out` is refused)

    DEFAULT_EPOCHS = 30.0

    @classmethod
    def create(cls, **options: Any) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            valid = ", ".join(sorted(names))
            raise UsageError(f"unknown option {unknown[0]!r}{did_you_mean(unknown[0], names)}; "
                             f"valid options: {valid}")
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
        check_range("workers", self.workers, 1, MAX_WORKERS)
        _choice("backend", self.backend, BACKENDS)
        _choice("dataset", self.dataset, data.DATASETS)
        if self.model is not None:
            _choice("model", self.model, models.MODELS)
        if self.steps is not None and self.epochs is not None:
            raise UsageError("give either steps or epochs, not both")
        if self.steps is not None:
            check_range("steps", self.steps, 1, MAX_STEPS)
        if self.epochs is not None:
            check_range("epochs", self.epochs, 0, MAX_EPOCHS, low_open=True)
        check_range("batch_size", self.batch_size, 1, MAX_BATCH)
        if self.lr is not None:
            check_range("lr", self.lr, 0, finite=True)
        check_range("momentum", self.momentum, 0, 1, high_open=True)
        check_range("weight_decay", self.weight_decay, 0, finite=True)
        check_range("seed", self.seed, 0, MAX_SEED)
        if self.eval_every is not None:
            check_range("eval_every", self.eval_every, 1, MAX_STEPS)
        _choice("sampling", self.sampling, SAMPLINGS)
        _choice("on_divergence", self.on_divergence, DIVERGENCE)
        _choice("on_failure", self.on_failure, ON_FAILURE)
        if self.on_failure == "continue" and self.algorithm not in survives_failures():
            raise UsageError(f"on_failure 'continue' does not support {self.algorithm!r}; "
                             f"valid algorithms: {', '.join(survives_failures())}")
        compute = ComputeModel.parse(self.compute_time)
        if compute.mode == "fixed":
            check_range("compute_time", compute.value, 0, MAX_SECONDS, meaning="seconds per step")
        elif compute.mode == "flops":
            check_range("compute_time flops rate", compute.value, 0, low_open=True, finite=True)
        check_range("cores", self.cores, 0)
        for index, factor in self.stragglers:
            check_range("straggler rank", index, 0, self.workers - 1)
            check_range("straggler factor", factor, 0, low_open=True, finite=True)
        check_range("slowdown sigma", Slowdown.parse(self.slowdown).sigma, 0, MAX_SIGMA)
        check_range("latency", self.latency, 0, MAX_SECONDS)
        check_range("bandwidth", self.bandwidth, 0, low_open=True, finite=True)
        check_range("timeout", self.timeout, 0, MAX_SECONDS, low_open=True)
        check_device(self.device, self.backend)
        self._check_checkpoints()
        world = self.world_size()
        for a, b, latency, bandwidth in self.links:
            check_range("link rank", a, 0, world - 1)
            check_range("link rank", b, 0, world - 1)
            check_range("link latency", latency, 0, MAX_SECONDS)
            check_range("link bandwidth", bandwidth, 0, low_open=True, finite=True)
        # Checks that need the run (e.g. crossover's groups against the workers) fail here,
        # before any data is loaded or process started; warnings are printed when it starts.
        self.make_algorithm().validate(self.workers, self.learning_rate)

    def _check_checkpoints(self) -> None:
        check_range("checkpoint_every", self.checkpoint_every, 0, MAX_STEPS)
        if self.stop_after is not None:
            if not self.checkpoint_every:
                raise UsageError("stop_after needs checkpoint_every > 0: a run stops right after "
                                 "writing a checkpoint")
            if not 1 <= self.stop_after <= MAX_STEPS or self.stop_after % self.checkpoint_every:
                raise UsageError(f"stop_after={self.stop_after} is not a checkpoint step: valid "
                                 f"values are multiples of checkpoint_every="
                                 f"{self.checkpoint_every} below the run's steps")
            if self.steps is not None:
                self.check_length(self.steps)
        algorithm = self.make_algorithm()
        if (self.checkpoint_every and self.backend != "sim" and not algorithm.synchronous
                and not self.roles().servers):
            raise UsageError(f"checkpoint_every: {self.algorithm} on real processes cannot be "
                             "checkpointed (its messages in flight between workers are not "
                             "captured there); valid backends for it: sim")
        if self.checkpoint_every and self.on_failure == "continue":
            raise UsageError("checkpoint_every cannot be combined with on_failure 'continue' (a "
                             "checkpoint needs every worker); valid: on_failure 'stop'")

    def check_length(self, total: int) -> None:
        """Checks that need the run's length in steps (known once the dataset is loaded)."""
        if total > MAX_STEPS:
            raise UsageError(f"epochs={self.epochs} make {total} steps per worker: valid runs "
                             f"take [1, {MAX_STEPS}] steps; give fewer epochs")
        if self.stop_after is not None and self.stop_after >= total:
            raise UsageError(f"stop_after={self.stop_after} is not a checkpoint step of a run of "
                             f"{total} steps: valid values are multiples of checkpoint_every="
                             f"{self.checkpoint_every} below {total}")

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

    def roles(self) -> Roles:
        """Which ranks serve and which train (servers first)."""
        return Roles.of(self.make_algorithm(), self.workers)

    def world_size(self) -> int:
        return self.roles().world_size

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


def survives_failures() -> tuple[str, ...]:
    """The algorithms whose survivors can carry on after a worker dies (--on-failure continue):
    gossip (no step waits for everyone) and the parameter servers (the server drops the dead)."""
    from distsgd.algorithms.ps import ParameterServerAlgorithm

    gossip = ("adpsgd", "gosgd", "sgp")
    return tuple(sorted(name for name, cls in algorithms.REGISTRY.items()
                        if name in gossip or issubclass(cls, ParameterServerAlgorithm)))


def check_device(device: str, backend: str) -> None:
    """cpu always; cuda and cuda:N only where torch sees that GPU. Real processes take plain
    cuda, each its own GPU (cuda:(local rank % GPUs)): NCCL refuses two ranks on one GPU."""
    head, colon, tail = device.partition(":")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    valid = "cpu" + (f", cuda, cuda:0..cuda:{count - 1}" if count else " (torch sees no CUDA GPU)")
    if device == "cpu" or (device == "cuda" and count):
        return
    if head == "cuda" and colon and tail.isdigit() and int(tail) < count:
        if backend != "sim":
            raise UsageError(f"device {device!r} is for the simulator; real processes take "
                             "device 'cuda' (each process its own GPU); valid: cpu, cuda")
        return
    raise UsageError(f"device {device!r} is not available; valid choices: {valid}")


def worker_device(device: str) -> torch.device:
    """Where this worker's model, optimizer and batches live: plain cuda is the current GPU (a
    real process's own, set by `distsgd.launch.init_process_group`)."""
    placed = torch.device(device)
    if placed.type == "cuda" and placed.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return placed


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UsageError(f"unknown {name} {value!r}{did_you_mean(value, valid)}; valid choices: "
                         f"{', '.join(valid)}")


@dataclass(frozen=True)
class Schedule:
    """The steps of a run at which something happens: every `every` steps strictly between 0 and
    `total`, plus the `ends` listed. Asked step by step (`step in schedule`, `after`), never
    listed: a run of 10^9 steps evaluated at each would otherwise hold 10^9 numbers."""

    every: int  # 0: only the ends
    total: int
    ends: frozenset[int] = frozenset()

    def __contains__(self, step: object) -> bool:
        if not isinstance(step, int):
            return False
        return step in self.ends or (self.every > 0 and 0 < step < self.total
                                     and step % self.every == 0)

    def after(self, step: int) -> int | None:
        """The first scheduled step above `step`, or None."""
        found = [e for e in self.ends if e > step]
        if self.every > 0:
            periodic = (max(step, 0) // self.every + 1) * self.every
            if periodic < self.total:
                found.append(periodic)
        return min(found, default=None)


def eval_steps(cfg: RunConfig, total: int) -> Schedule:
    """Step 0, the last step, and every eval_every (default: about ten evaluations a run)."""
    return Schedule(cfg.eval_every or max(1, total // 10), total, frozenset({0, total}))


def checkpoint_steps(cfg: RunConfig, total: int) -> Schedule:
    """Every checkpoint_every steps before the last (0: never)."""
    return Schedule(cfg.checkpoint_every, total)
