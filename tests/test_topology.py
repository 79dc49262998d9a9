"""Topologies are pure data: checked without any runtime."""

from __future__ import annotations

import numpy as np
import pytest

from distsgd import topology

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("n, shifts", [(1, []), (2, [1]), (5, [1, 2, 4]), (8, [1, 2, 4]),
                                       (9, [1, 2, 4, 8])])
def test_exponential_shifts(n: int, shifts: list[int]) -> None:
    assert topology.exponential_shifts(n) == shifts


@pytest.mark.parametrize("n, peers", [(8, 1), (8, 2), (6, 1), (16, 3)])
def test_exponential_graph_is_regular_and_in_peers_invert_out_peers(n: int, peers: int) -> None:
    for step in range(7):
        outs = {r: topology.exponential_out_peers(r, step, n, peers) for r in range(n)}
        for r in range(n):
            ins = topology.exponential_in_peers(r, step, n, peers)
            assert sorted(ins) == sorted(s for s in range(n) if r in outs[s])
            assert len(set(outs[r])) == peers and r not in outs[r]


def test_one_peer_graph_cycles_through_powers_of_two() -> None:
    assert [topology.exponential_out_peers(0, t, 8)[0] for t in range(6)] == [1, 2, 4, 1, 2, 4]


def test_too_many_peers_is_an_error() -> None:
    with pytest.raises(ValueError, match="peers=4"):
        topology.exponential_out_peers(0, 0, 8, peers=4)


@pytest.mark.parametrize("n", [2, 3, 7, 16])
def test_derangement_has_no_fixed_point_and_is_a_permutation(n: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        perm = topology.derangement(n, rng)
        assert sorted(perm) == list(range(n))
        assert all(p != i for i, p in enumerate(perm))


def test_derangements_are_uniform_for_n3() -> None:
    # Only two derangements of 3 exist, both 3-cycles: each must come up about half the time.
    rng = np.random.default_rng(1)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(2000):
        key = tuple(topology.derangement(3, rng))
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {(1, 2, 0), (2, 0, 1)}
    assert abs(counts[(1, 2, 0)] - 1000) < 150


def test_crossover_schedule_is_shared_and_varies() -> None:
    a = topology.crossover_targets(8, 3, 1, seed=42)
    assert a == topology.crossover_targets(8, 3, 1, seed=42)  # same on every worker
    others = {tuple(topology.crossover_targets(8, t, s, seed=42)) for t in range(5)
              for s in range(3)}
    assert len(others) > 5


def test_fair_schedule_gives_each_worker_exactly_one_copy() -> None:
    for step in range(20):
        targets = topology.crossover_targets(6, step, 0, seed=0, fair=True)
        assert all(len(topology.sources(targets, r)) == 1 for r in range(6))


def test_unfair_schedule_never_targets_self_and_is_uneven_sometimes() -> None:
    uneven = False
    for step in range(50):
        targets = topology.crossover_targets(6, step, 0, seed=0, fair=False)
        assert all(t != i and 0 <= t < 6 for i, t in enumerate(targets))
        uneven |= any(len(topology.sources(targets, r)) != 1 for r in range(6))
    assert uneven


def test_contiguous_groups() -> None:
    assert topology.contiguous_groups(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert topology.contiguous_groups(4, 1) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        topology.contiguous_groups(3, 4)
