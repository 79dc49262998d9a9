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


def npeer_distances(n: int, peers: int = 1) -> list[int]:
    """Out-peer distances of the k-peer exponential graph, in the order the steps cycle through.

    The SGP reference code's N-peer graph (`NPeerDynamicDirectedExponentialGraph`): distances
    j·(k+1)^i for i = 0, 1, ... while (k+1)^i <= n - 1 and j = 1..k, i-major, taken mod n. With
    k = 1 these are the powers of two 1, 2, 4, ... < n of Assran et al. 2019, §4; with k = 2,
    n = 8: 1, 2, 3, 6. Two departures, both where n is not a power of k + 1 and the reference's
    list wraps: a distance that lands on the worker itself (j·(k+1)^i ≡ 0 mod n) or on a peer
    already listed is dropped, where the reference would message itself or the same peer twice
    in one step. The bound on i is computed in integers: the reference's float log rounds
    log_3(243) down to 4.
    """
    distances: list[int] = []
    power = 1
    while power <= n - 1:
        for j in range(1, peers + 1):
            d = j * power % n
            if d and d not in distances:
                distances.append(d)
        power *= peers + 1
    return distances


def exponential_out_peers(rank: int, step: int, n: int, peers: int = 1) -> list[int]:
    """Out-peers of `rank` at `step` on the time-varying directed k-peer exponential graph.

    Step t uses the k distances at positions t·k, ..., t·k + k - 1 (mod their number) of
    `npeer_distances`: the reference's rotation of its phone book by k a step, starting at 0.
    With one peer, rank i sends to i + 2^(t mod ⌊log2(n−1)⌋+1).
    """
    distances = npeer_distances(n, peers)
    if not distances:
        return []
    if not 1 <= peers <= n - 1:
        raise ValueError(f"peers={peers} must lie in [1, {n - 1}] for {n} workers")
    return [(rank + d) % n for d in _step_distances(distances, step, peers)]


def exponential_in_peers(rank: int, step: int, n: int, peers: int = 1) -> list[int]:
    """The ranks whose out-peers at `step` include `rank` (every rank uses the same distances)."""
    distances = npeer_distances(n, peers)
    if not distances:
        return []
    return [(rank - d) % n for d in _step_distances(distances, step, peers)]


def _step_distances(distances: list[int], step: int, peers: int) -> list[int]:
    # peers <= n - 1 <= len(distances) (j = 1..k at i = 0 are distinct): no repeat in a step.
    return [distances[(step * peers + j) % len(distances)] for j in range(peers)]


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


def crossover_sources(n: int, step: int, segment: int, seed: int,
                      fair: bool = True) -> list[int]:
    """sources[i]: the worker whose copy of segment `segment` worker i receives at `step`.

    Every worker receives exactly one copy of every segment, fair or not. fair (load-balanced,
    Yeo et al. 2020): sources is a derangement, so every worker also sends exactly one copy: no
    hotspot, and the mixing is doubly stochastic. Unfair (the ablation, as Crossover-SGD's
    reference code draws it): each worker picks whom it receives from independently, so some
    workers send several copies and some none, and the average model drifts.
    """
    rng = shared_rng(seed, step, segment)
    if fair:
        # The derangement is drawn as targets (i sends to targets[i]) and inverted, so that
        # fair schedules stay those of earlier versions draw for draw.
        sources = [0] * n
        for i, t in enumerate(derangement(n, rng)):
            sources[t] = i
        return sources
    picks = rng.integers(0, n - 1, size=n)
    return [int(p + (p >= i)) for i, p in enumerate(picks)]  # skip self


def receivers(sources: list[int], rank: int) -> list[int]:
    """The workers that receive from `rank` under `sources`, in rank order."""
    return [i for i, s in enumerate(sources) if s == rank]


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
