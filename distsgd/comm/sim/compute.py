"""The simulator's compute model: how long a worker's step takes in virtual time, and the seeded
slowdowns (stragglers, random jitter) that make workers differ."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from distsgd.errors import UsageError, check_range


@dataclass(frozen=True)
class ComputeModel:
    """How long one step's computation takes in virtual time.

    flops: 3 × forward FLOPs × batch / rate (backward ≈ 2 × forward), deterministic, the default
    because it keeps simulated runs reproducible; measured: the real forward/backward/step time of
    that worker; fixed: the same number of seconds for every step. `share`: how many times longer
    every step takes because the worker shares a core (`on_cores`); 1: a core of its own.
    """

    mode: str
    value: float = 0.0
    share: float = 1.0

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

    def on_cores(self, processes: int, cores: int) -> ComputeModel:
        """This model for `processes` busy processes sharing `cores` cores (`cpu_share`)."""
        return replace(self, share=cpu_share(processes, cores))

    def step_seconds(self, flops_per_sample: int, batch: int, measured: float) -> float:
        if self.mode == "flops":
            return self.share * 3.0 * flops_per_sample * batch / self.value
        if self.mode == "measured":
            return self.share * measured
        return self.share * self.value


def cpu_share(processes: int, cores: int) -> float:
    """How many times longer a step's computation takes when `processes` processes that compute
    at the same time share `cores` cores: max(1, processes / cores), as the scheduler gives each
    an equal slice (cores=0: a core each, 1). Synchronous steps start together, so their
    computations do overlap; a rank that waits for the network leaves its core to the others,
    which this bound does not credit (docs/multi-machine.md, "Calibration")."""
    if cores == 0:
        return 1.0
    check_range("cores", cores, 1)
    check_range("processes", processes, 1)
    return max(1.0, processes / cores)


# CPU seconds per byte that a gloo send or receive costs its process (the copies into and out of
# the socket, TCP), per side. Measured, not fitted: two local processes send each other a 1.2 MB
# tensor 100 times, each one's getrusage CPU over the bytes it moved: 0.61–0.77 ns in three runs
# on the benchmark machine (docs/multi-machine.md, "transfer CPU"); `benchmarks.network` measures
# it on each run's own link (probe `transfer_cpu`) and `benchmarks.calibrate` prints both.
TRANSFER_CPU = 0.7e-9


def transfer_cpu(processes: int, cores: int, per_byte: float = TRANSFER_CPU) -> float:
    """`NetworkModel.cpu_per_byte` for `processes` processes sharing `cores` cores: the CPU of
    moving a byte, stretched by the cores' share as computation is (`cpu_share`), where no core
    is spare. Fewer processes than cores, or cores=0 (a core each, the simulator's default),
    give 0: a spare core moves the bytes."""
    if cores == 0 or processes < cores:
        return 0.0
    return per_byte * cpu_share(processes, cores)


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

    def factors(self, seed: int, worker: int) -> Jitter:
        return Jitter(self.sigma, np.random.default_rng([seed, 0x5104, worker]))


@dataclass
class Jitter(Iterator[float]):
    """One worker's stream of slowdown factors; its generator is saved in checkpoints."""

    sigma: float
    rng: np.random.Generator

    def __next__(self) -> float:
        return float(np.exp(self.sigma * self.rng.standard_normal())) if self.sigma else 1.0

