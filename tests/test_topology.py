"""Topologies are pure data: checked without any runtime."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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
    with pytest.raises(ValueError, match=r"peers=8 must lie in \[1, 7\]"):
        topology.exponential_out_peers(0, 0, 8, peers=8)


def reference_phone_book(n: int, k: int) -> list[int]:
    """The SGP reference's N-peer exponential graph, written from its formula: every rank's
    out-peer distances j·(k+1)^i mod n for i in 0..int(log_{k+1}(n-1)) and j in 1..k, i-major,
    with no deduplication (the reference's membership test compares a rank with Edge objects,
    so it never matches)."""
    return [j * (k + 1) ** i % n for i in range(int(math.log(n - 1, k + 1)) + 1)
            for j in range(1, k + 1)]


def reference_out_peers(rank: int, step: int, n: int, k: int) -> list[int]:
    """The reference's peers at `step`: group indices start at 0..k-1 (the first
    refresh does not rotate) and advance by k, mod the phone book's length, after every mix."""
    book = reference_phone_book(n, k)
    return [(rank + book[(step * k + j) % len(book)]) % n for j in range(k)]


def test_reference_example_eight_workers_two_peers() -> None:
    # The example: distances j·3^i, N = 8 → {1, 2}, {3, 6}, then again.
    assert [topology.exponential_out_peers(0, t, 8, 2) for t in range(3)] == [[1, 2], [3, 6],
                                                                             [1, 2]]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_schedule_follows_the_reference_formula_for_4_to_64_workers(k: int) -> None:
    exact = 0
    for n in range(4, 65):
        book = reference_phone_book(n, k)
        clean = [d for i, d in enumerate(book) if d != 0 and d not in book[:i]]
        # Where the reference's distances wrap onto the worker itself or repeat, ours drop them.
        assert topology.npeer_distances(n, k) == clean, n
        if clean != book:
            continue
        exact += 1
        for step in range(2 * len(book) + 1):  # two full rotations and one more step
            for rank in (0, n // 2, n - 1):
                assert topology.exponential_out_peers(rank, step, n, k) == \
                    reference_out_peers(rank, step, n, k), (n, step, rank)
    assert exact == {1: 61, 2: 46, 3: 36}[k]  # the step-by-step check is not vacuous


def test_one_peer_schedule_is_the_powers_of_two() -> None:
    for n in range(2, 65):
        assert topology.npeer_distances(n, 1) == topology.exponential_shifts(n)


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
    a = topology.crossover_sources(8, 3, 1, seed=42)
    assert a == topology.crossover_sources(8, 3, 1, seed=42)  # same on every worker
    others = {tuple(topology.crossover_sources(8, t, s, seed=42)) for t in range(5)
              for s in range(3)}
    assert len(others) > 5


@pytest.mark.parametrize("fair", [True, False])
def test_every_worker_receives_exactly_one_copy_per_segment_per_step(fair: bool) -> None:
    for n in (2, 3, 6):
        for step in range(20):
            for segment in range(3):
                sources = topology.crossover_sources(n, step, segment, seed=0, fair=fair)
                assert len(sources) == n
                assert all(s != i and 0 <= s < n for i, s in enumerate(sources))
                # receivers() inverts sources: each worker is among exactly one sender's list.
                lists = [topology.receivers(sources, r) for r in range(n)]
                assert sorted(i for got in lists for i in got) == list(range(n))


def test_fair_schedule_sends_one_copy_each() -> None:
    for step in range(20):
        sources = topology.crossover_sources(6, step, 0, seed=0, fair=True)
        assert sorted(sources) == list(range(6))  # a permutation: one copy out each


def test_unfair_schedule_sends_unevenly_sometimes() -> None:
    # The reference's ablation: one copy in, any number out, so some workers send none.
    silent = 0
    for step in range(50):
        sources = topology.crossover_sources(6, step, 0, seed=0, fair=False)
        silent += sum(not topology.receivers(sources, r) for r in range(6))
    assert 50 < silent < 250  # about 6·(4/5)^5 ≈ 2 silent workers a step


def test_fair_schedule_is_unchanged_from_the_send_side_draw() -> None:
    # Drawn as a derangement of targets and inverted: the same pairs as before sources existed.
    rng = np.random.default_rng([42, 3, 1])
    targets = topology.derangement(8, rng)
    sources = topology.crossover_sources(8, 3, 1, seed=42)
    assert all(sources[t] == i for i, t in enumerate(targets))


def test_contiguous_groups() -> None:
    assert topology.contiguous_groups(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert topology.contiguous_groups(4, 1) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        topology.contiguous_groups(3, 4)


def test_fine_chromosome_gives_each_residual_block_of_resnet20_its_own_segment() -> None:
    from distsgd import models
    from distsgd.algorithms.crossover import fine_blocks
    from distsgd.flat import FlatState

    model = models.build("resnet20", (3, 32, 32), 10)
    flat = FlatState(model)
    sizes = fine_blocks(model, flat.tensors)
    assert sum(sizes) == flat.numel
    stem, *stages, head_block = model.children()
    blocks = [b for stage in stages for b in stage.children()]
    assert len(blocks) == 9
    (stem_conv, stem_bn, _), head = list(stem.children()), list(head_block.children())[2]
    # Parameters first, in model order: stem conv, stem BN, nine blocks, classifier; then the
    # float buffers of the stem BN and of each block.
    def numel(m: torch.nn.Module, buffers: bool = False) -> int:
        tensors = m.buffers() if buffers else m.parameters()
        return sum(t.numel() for t in tensors if t.is_floating_point())

    expected = [numel(stem_conv), numel(stem_bn), *map(numel, blocks), numel(head),
                numel(stem_bn, True), *(numel(b, True) for b in blocks)]
    assert sizes == expected
    assert len(sizes) > len(flat.blocks)  # finer than the per-top-level-block default
