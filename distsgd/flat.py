"""A model's communicated state as one flat vector: parameters, then floating-point buffers.

Algorithms exchange parameters and BatchNorm running statistics alike (ALGORITHMS.md), so both go
into the vector; integer buffers (``num_batches_tracked``) stay local. Gradients exist only for the
parameter part, which is the vector's prefix of length ``num_params``.
"""

from __future__ import annotations

import torch
from torch import nn


class FlatState:
    """Views a model's parameters and float buffers as one flat vector, in a fixed order."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters()]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.tensors = self.params + self.buffers
        self.sizes = [t.numel() for t in self.tensors]
        self.num_params = sum(p.numel() for p in self.params)
        self.numel = sum(self.sizes)
        self.dtype = self.params[0].dtype if self.params else torch.float32
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.blocks = _top_level_blocks(model, self.tensors)

    def get(self) -> torch.Tensor:
        """A new flat copy of the state."""
        return torch.cat([t.detach().reshape(-1) for t in self.tensors])

    def set_(self, flat: torch.Tensor) -> None:
        """Write `flat` into the model's tensors."""
        with torch.no_grad():
            for t, piece in zip(self.tensors, flat.split(self.sizes), strict=True):
                t.copy_(piece.view_as(t))

    def grads(self) -> torch.Tensor:
        """The parameters' gradients as a new flat vector (zeros where a gradient is missing)."""
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in self.params
        ])

    def buffer_values(self) -> torch.Tensor:
        """The float buffers alone, as a new flat vector (empty for models without buffers)."""
        if not self.buffers:
            return torch.empty(0, dtype=self.dtype, device=self.device)
        return torch.cat([b.detach().reshape(-1) for b in self.buffers])

    def set_buffers_(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for b, piece in zip(self.buffers, flat.split(self.sizes[len(self.params) :]),
                                strict=True):
                b.copy_(piece.view_as(b))

    def set_grads_(self, flat: torch.Tensor) -> None:
        pieces = flat[: self.num_params].split(self.sizes[: len(self.params)])
        for p, piece in zip(self.params, pieces, strict=True):
            if p.grad is None:
                p.grad = piece.view_as(p).clone()
            else:
                p.grad.copy_(piece.view_as(p))


def _top_level_blocks(model: nn.Module, tensors: list[torch.Tensor]) -> list[int]:
    """Sizes of the flat vector's segments, one per top-level child module holding state.

    Crossover-SGD's default segments. State that belongs to no child (parameters registered on the
    root) forms a segment of its own. The segments follow the vector's order, so the ids of the
    tensors of each child are looked up rather than assumed contiguous.
    """
    owner: dict[int, int] = {}
    for i, (_, child) in enumerate(model.named_children()):
        for t in list(child.parameters()) + list(child.buffers()):
            owner.setdefault(id(t), i)
    blocks: list[int] = []
    last: int | None = None
    for t in tensors:
        o = owner.get(id(t), -1)
        if blocks and o == last:
            blocks[-1] += t.numel()
        else:
            blocks.append(t.numel())
            last = o
    return blocks
