"""`Dataset`: a classification data set held in memory, how loaders build one, and its test score.

Every loader gives images as float32 in [0, 1] with shape (N, C, H, W) (feature vectors as (N, F))
and labels as int64; `evaluate` is the one measurement made on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distsgd.errors import UsageError


@dataclass(frozen=True)
class Dataset:
    """A classification data set held in memory; x as float32, y as int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) for images, (F,) for feature vectors


def from_arrays(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                y_test: np.ndarray, num_classes: int) -> Dataset:
    """A `Dataset` from numpy arrays (copied to contiguous float32 / int64 tensors)."""
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
    )


def unit(pixels: np.ndarray) -> np.ndarray:
    """Bytes 0..255 as float32 in [0, 1], without a float64 intermediate (CIFAR-10 would need
    1.2 GB for it)."""
    out = pixels.astype(np.float32)
    out /= 255.0
    return out


def check_labelled(x: np.ndarray, y: np.ndarray, num_classes: int, what: str) -> None:
    """A file set read from disk: as many images as labels, every label a class."""
    if len(x) != len(y) or len(y) == 0:
        raise UsageError(f"corrupt {what}: {len(x)} images but {len(y)} labels")
    if y.max() >= num_classes:
        raise UsageError(f"corrupt {what}: label {int(y.max())} outside 0..{num_classes - 1}")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on the test set, in eval mode.

    The model's previous train/eval mode is restored afterwards; inputs go to the device of its
    first parameter.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size} is out of range: it must be at least 1")
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    try:
        for x, y in zip(dataset.x_test.split(batch_size), dataset.y_test.split(batch_size),
                        strict=True):
            logits = model(x.to(device))
            y = y.to(device)
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum().item())
    finally:
        model.train(was_training)
    n = len(dataset.y_test)
    return correct / n, loss / n
