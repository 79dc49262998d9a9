"""The algorithms' pure tensor math, checked without any runtime."""

from __future__ import annotations

import pytest
import torch

from distsgd import mixing

pytestmark = pytest.mark.timeout(30)


def test_average_and_weighted_average() -> None:
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    assert torch.equal(mixing.average(xs), torch.tensor([2.0, 4.0]))
    assert torch.allclose(mixing.weighted_average(xs, [0.25, 0.75]), torch.tensor([2.5, 5.0]))
    assert xs[0].tolist() == [1.0, 2.0]  # inputs untouched


def test_consensus_distance() -> None:
    xs = [torch.tensor([0.0, 0.0]), torch.tensor([6.0, 8.0])]  # each 5 from the mean (3, 4)
    assert mixing.consensus_distance(xs) == pytest.approx(5.0)
    assert mixing.consensus_distance([torch.ones(3)] * 4) == 0.0


def test_push_sum_share_conserves_mass() -> None:
    x = torch.randn(10, dtype=torch.float64)
    share, w = mixing.push_sum_share(x, 0.7, 3)
    assert torch.allclose(share * 3, x) and w * 3 == pytest.approx(0.7)
    assert torch.allclose(mixing.debias(share, w), x / 0.7)


def test_elastic_difference_moves_worker_and_center_symmetrically() -> None:
    x, center = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    d = mixing.elastic_difference(x, center, 0.25)
    assert torch.equal(d, torch.tensor([0.5, -1.0]))
    assert torch.equal((x - d) + (center + d), x + center)  # Σ x_i + x̃ conserved


def test_segments() -> None:
    assert mixing.equal_segments(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert mixing.equal_segments(5, 1) == [(0, 5)]
    assert mixing.block_segments([3, 0, 2]) == [(0, 3), (3, 3), (3, 5)]
    with pytest.raises(ValueError):
        mixing.equal_segments(3, 4)


@pytest.mark.parametrize("w", [1 / 3, 0.1, 1e-300, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_weight_is_bit_exact(w: float, dtype: torch.dtype) -> None:
    packed = mixing.pack_weight(w, dtype)
    assert packed.numel() == mixing.weight_slots(dtype)
    message = torch.cat([torch.randn(5, dtype=dtype), packed])  # odd offset, as in a message
    assert mixing.unpack_weight(message[-mixing.weight_slots(dtype):]) == w
