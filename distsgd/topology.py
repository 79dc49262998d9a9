"""Who talks to whom at step t: pure data. Randomness comes from a seed every worker shares.

Every worker computes the same schedule from (seed, step, segment) without any negotiation, so a
topology never needs a message of its own (SGP reference code's graph_manager, minus the process
groups it welds to the graph).
"""

from __future__ import annotations

import numpy as np


def shared_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that every worker derives identically from the shared seed and `keys`."""
    return np.random.default_rng([seed, *keys])


def exponential_shifts(n: int) -> list[int]:
    """The offsets 1, 2, 4, ... < n of the exponential graph (Assran et al. 2019, §4)."""
    shifts, s = [], 1
    while s < n:
        shifts.append(s)
        s *= 2
    return shifts


def exponential_out_peers(rank: int, step: int, n: int, peers: int = 1) -> list[int]:
    """Out-peers of `rank` at `step` on the time-varying directed exponential graph.

    With one peer per step, rank i sends to i + 2^(t mod log2 n); with k peers it uses k
    consecutive offsets of the cycle, so every offset is used equally often.
    """
    shifts = exponential_shifts(n)
    if not shifts:
        return []
    if not 1 <= peers <= len(shifts):
        raise ValueError(f"peers={peers} must lie in [1, {len(shifts)}] for {n} workers")
    return [(rank + shifts[(step * peers + j) % len(shifts)]) % n for j in range(peers)]


def exponential_in_peers(rank: int, step: int, n: int, peers: int = 1) -> list[int]:
    """The ranks whose out-peers at `step` include `rank` (the graph is regular)."""
    shifts = exponential_shifts(n)
    if not shifts:
        return []
    return [(rank - shifts[(step * peers + j) % len(shifts)]) % n for j in range(peers)]


def derangement(n: int, rng: np.random.Generator) -> list[int]:
    """A uniformly random permutation of range(n) without fixed points (n >= 2).

    Rejection sampling: about e ≈ 2.7 draws on average, and uniform over derangements, unlike
    Sattolo's algorithm which only yields single cycles.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return [int(p) for p in perm]


def crossover_targets(n: int, step: int, segment: int, seed: int, fair: bool = True) -> list[int]:
    """targets[i]: the worker that worker i sends segment `segment` to at `step`.

    fair (load-balanced, Yeo et al. 2020): targets is a derangement, so every worker receives
    exactly one copy of every segment. Unfair (the ablation): each worker picks any other worker
    independently, so some receive several copies and some none.
    """
    rng = shared_rng(seed, step, segment)
    if fair:
        return derangement(n, rng)
    picks = rng.integers(0, n - 1, size=n)
    return [int(p + (p >= i)) for i, p in enumerate(picks)]  # skip self


def sources(targets: list[int], rank: int) -> list[int]:
    """The workers that send to `rank` under `targets`, in rank order."""
    return [i for i, t in enumerate(targets) if t == rank]


def contiguous_groups(n: int, groups: int) -> list[list[int]]:
    """Split range(n) into `groups` contiguous groups whose sizes differ by at most one."""
    if not 1 <= groups <= n:
        raise ValueError(f"groups={groups} must lie in [1, {n}]")
    base, extra = divmod(n, groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (g < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out
