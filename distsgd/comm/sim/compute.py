"""The simulator's compute model: how long a worker's step takes in virtual time, and the seeded
slowdowns (stragglers, random jitter) that make workers differ."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from distsgd.errors import UsageError, check_range


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

    def factors(self, seed: int, worker: int) -> Jitter:
        return Jitter(self.sigma, np.random.default_rng([seed, 0x5104, worker]))


@dataclass
class Jitter(Iterator[float]):
    """One worker's stream of slowdown factors; its generator is saved in checkpoints."""

    sigma: float
    rng: np.random.Generator

    def __next__(self) -> float:
        return float(np.exp(self.sigma * self.rng.standard_normal())) if self.sigma else 1.0

