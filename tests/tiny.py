"""A tiny model and deterministic batches shared by the algorithm tests."""

from __future__ import annotations

import torch
from torch import nn


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(worker: int, step: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker `worker`'s batch at `step`: the same in every process and every run."""
    g = torch.Generator().manual_seed(1000 * step + worker)
    return torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)
