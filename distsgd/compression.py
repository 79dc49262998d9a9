"""Pure tensor math of gradient compression: PowerSGD's low-rank factors (Vogels et al. 2019).

Tensors in, tensors out; nothing here knows about workers or networks. The conventions follow
PyTorch's ``ddp_comm_hooks.powerSGD_hook`` so that the two can be compared step for step: a
gradient of shape (n, ...) is viewed as an n × m matrix, Gram-Schmidt for rank ≤ 2 (QR above),
Q drawn from a standard normal.
"""

from __future__ import annotations

import numpy as np
import torch


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The (rows, columns) a parameter of `shape` is compressed as: (shape[0], the rest)."""
    rows = shape[0]
    return rows, int(np.prod(shape)) // rows if rows else 0


def compressible(shape: torch.Size | tuple[int, ...]) -> bool:
    """Matrices and higher (conv kernels) are compressed; vectors and scalars go as they are."""
    return len(shape) > 1


def factor_rank(rows: int, cols: int, rank: int) -> int:
    """The rank actually used: never more than the matrix has."""
    return min(rows, cols, rank)


def initial_q(cols: int, rank: int, seed: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """A cols × rank standard normal draw from its own generator, so every worker given the same
    seed draws the same Q (P = MQ is summed over workers: their Qs must agree)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(cols, rank, generator=generator, dtype=dtype).to(device)


def orthogonalize_(matrix: torch.Tensor) -> torch.Tensor:
    """Make the columns of `matrix` (rows ≥ columns) orthonormal in place, as PyTorch's hook does:
    Gram-Schmidt for at most 2 columns or half precision, QR otherwise. A zero column stays zero
    (PyTorch's would be NaN with epsilon 0; any non-zero norm gives the same bits)."""
    rows, cols = matrix.shape
    if cols > rows:
        raise ValueError(f"cannot orthogonalize {cols} columns of length {rows}")
    if cols <= 2 or matrix.dtype in (torch.float16, torch.bfloat16):
        tiny = torch.finfo(matrix.dtype).tiny
        for i in range(cols):
            col = matrix[:, i : i + 1]
            col /= torch.norm(col, dim=0, keepdim=True).clamp_min(tiny)
            if i + 1 < cols:
                rest = matrix[:, i + 1 :]
                rest -= torch.sum(col * rest, dim=0, keepdim=True) * col
    else:
        q, _ = torch.linalg.qr(matrix)
        matrix.copy_(q)
    return matrix


def low_rank_bytes(shapes: list[tuple[int, ...]], rank: int, itemsize: int = 4) -> tuple[int, int]:
    """Bytes of all P factors and of all Q factors for parameters of `shapes` (vectors excluded)."""
    p = q = 0
    for shape in shapes:
        if compressible(shape):
            rows, cols = matrix_shape(shape)
            r = factor_rank(rows, cols, rank)
            p, q = p + rows * r * itemsize, q + cols * r * itemsize
    return p, q
