"""A model's communicated state as one flat vector: parameters, then floating-point buffers.

Algorithms exchange parameters and BatchNorm running statistics alike (the design's algorithm
notes), so both go into the vector; integer buffers (``num_batches_tracked``) stay local.
Gradients exist only for the parameter part, which is the vector's prefix of length
``num_params``.
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
        # One flat gradient buffer whose pieces the parameters' .grad are views of (DDP's
        # gradient_as_bucket_view): autograd accumulates into it, so communicating gradients
        # needs no concatenation and no copy back.
        self._grad_flat = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        self._grad_views = [piece.view_as(p) for p, piece in zip(
            self.params, self._grad_flat.split(self.sizes[: len(self.params)]), strict=True)]

    def get(self) -> torch.Tensor:
        """A new flat copy of the state."""
        return torch.cat([t.detach().reshape(-1) for t in self.tensors])

    def set_(self, flat: torch.Tensor) -> None:
        """Write `flat` into the model's tensors."""
        with torch.no_grad():
            for t, piece in zip(self.tensors, flat.split(self.sizes), strict=True):
                t.copy_(piece.view_as(t))

    def grad_buffer(self) -> torch.Tensor:
        """The gradients as one flat buffer, live: writing it changes the parameters' .grad.

        Free when every .grad already is a view of the buffer (after a zero_grad that zeroes in
        place); a gradient that is missing or was replaced (zero_grad(set_to_none=True)) is copied
        in once and its .grad made a view again.
        """
        for p, view in zip(self.params, self._grad_views, strict=True):
            grad = p.grad
            if grad is None:
                view.zero_()
                p.grad = view
            elif grad.data_ptr() != view.data_ptr():
                view.copy_(grad)
                p.grad = view
        return self._grad_flat

    def grads(self) -> torch.Tensor:
        """The parameters' gradients as a new flat vector (zeros where a gradient is missing)."""
        return self.grad_buffer().clone()

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
        self.grad_buffer().copy_(flat[: self.num_params])


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
