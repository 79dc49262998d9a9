"""Pure tensor math of the algorithms: averaging, push-sum, elastic pull, segments.

Tensors in, tensors out; nothing here knows about workers or networks, so every rule is tested
without a runtime (tests/test_mixing.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The plain mean, summed in the given order (callers fix the order for reproducibility)."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total.div_(len(tensors))


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i t_i / Σ w_i, accumulated in float64 so that tiny gossip weights lose nothing."""
    total = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights, strict=True):
        total.add_(t.double(), alpha=float(w))
    return (total / float(sum(weights))).to(tensors[0].dtype)


def consensus_distance(tensors: Sequence[torch.Tensor]) -> float:
    """Mean over workers of ||x_i − x̄||: how far the workers have drifted apart."""
    mean = average(tensors)
    return float(sum(torch.linalg.vector_norm(t - mean).item() for t in tensors) / len(tensors))


def push_sum_share(x: torch.Tensor, w: float, parts: int) -> tuple[torch.Tensor, float]:
    """The share of (numerator, weight) that push-sum keeps and sends to each of `parts`−1 peers.

    Uniform mixing: a worker with k out-peers splits into k + 1 equal parts (k = 1: halves; the
    Crossover paper's 2-peer SGP: thirds).
    """
    return x / parts, w / parts


def debias(x: torch.Tensor, w: float) -> torch.Tensor:
    """The push-sum estimate z = x / w that gradients are taken at."""
    return x / w


def elastic_difference(x: torch.Tensor, center: torch.Tensor, alpha: float) -> torch.Tensor:
    """EASGD's d = α (x − x̃): the worker moves by −d, the center by +d (Zhang et al. 2015)."""
    return (x - center).mul_(alpha)


def equal_segments(numel: int, m: int) -> list[tuple[int, int]]:
    """[start, end) bounds of `m` contiguous chunks of a vector whose sizes differ by at most 1."""
    if not 1 <= m <= max(numel, 1):
        raise ValueError(f"cannot cut {numel} elements into {m} segments")
    base, extra = divmod(numel, m)
    bounds, start = [], 0
    for s in range(m):
        end = start + base + (s < extra)
        bounds.append((start, end))
        start = end
    return bounds


def block_segments(block_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) bounds of consecutive blocks (one per top-level module of the model)."""
    bounds, start = [], 0
    for size in block_sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def pack_weight(w: float, dtype: torch.dtype,
                device: torch.device | str | None = None) -> torch.Tensor:
    """A float64 weight as raw bits in a tensor of `dtype`, to ride exactly in a model message.

    Push-sum weights such as 1/3 are not exact in float32; reinterpreting the float64's bytes
    keeps every bit at the cost of two float32 slots instead of a second message.
    """
    return torch.tensor([w], dtype=torch.float64, device=device).view(dtype)


def unpack_weight(t: torch.Tensor) -> float:
    return float(t.clone().view(torch.float64)[0])


def weight_slots(dtype: torch.dtype) -> int:
    """How many elements of `dtype` a packed float64 weight occupies."""
    return 8 // torch.empty(0, dtype=dtype).element_size()


_INDEX_DTYPE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def top_k(vector: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of the k entries of largest magnitude, indices ascending."""
    indices = torch.topk(vector.abs(), k, sorted=False).indices.sort().values
    return indices, vector[indices]


def pack_sparse(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One message of the values followed by their indices, reinterpreted in the values' dtype.

    A sparse push of k entries then costs k × (value + index) bytes: 8 per entry in float32.
    """
    index_dtype = _INDEX_DTYPE[values.element_size()]
    return torch.cat([values, indices.to(index_dtype).view(values.dtype)])


def unpack_sparse(payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) from `pack_sparse`'s message."""
    k = payload.numel() // 2
    index_dtype = _INDEX_DTYPE[payload.element_size()]
    return payload[:k], payload[k:].clone().view(index_dtype).long()


def densify(indices: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
    dense = torch.zeros(numel, dtype=values.dtype, device=values.device)
    dense[indices] = values
    return dense


def nesterov_gradient(
    grad: torch.Tensor, buffer: torch.Tensor, delta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nesterov momentum as a modified gradient for a plain SGD step (torch's formulation).

    b ← δ b + g and g' ← g + δ b, so that x ← x − η g' is EAMSGD's v ← δ v − η ∇f(x + δ v),
    x ← x + v written in the look-ahead variable x + δ v. With δ = 0 it returns g itself.
    """
    buffer = buffer.mul(delta).add_(grad)
    return grad + delta * buffer, buffer
