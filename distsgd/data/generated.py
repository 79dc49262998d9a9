"""The two data sets that need no files: scikit-learn's bundled digits and synthetic blobs."""

from __future__ import annotations

import numpy as np

from distsgd.data.dataset import Dataset, from_arrays

# Fixed seeds make the digits split and the synthetic set the same in every process and run.
SPLIT_SEED = 0
SYNTHETIC_SEED = 0


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), split 80/20 by a fixed permutation."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    bunch = load_digits()
    x = (bunch.images / 16.0).reshape(-1, 1, 8, 8)  # pixel values are counts 0..16
    y = bunch.target
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    test, train = order[: len(y) // 5], order[len(y) // 5:]
    return from_arrays("digits", x[train], y[train], x[test], y[test], 10)


def load_synthetic(classes: int = 10, features: int = 32, train: int = 2000,
                   test: int = 500) -> Dataset:
    """Gaussian blobs: one unit-variance cloud per class around a random center.

    A center spread of 0.8 leaves the classes overlapping a little: an MLP or logistic regression
    reaches about 98% test accuracy, so the task is learnable yet not trivially perfect.
    """
    rng = np.random.default_rng(SYNTHETIC_SEED)
    centers = rng.normal(0.0, 0.8, size=(classes, features))
    y = rng.permutation(np.arange(train + test) % classes)
    x = centers[y] + rng.normal(size=(train + test, features))
    return from_arrays("synthetic", x[:train], y[:train], x[train:], y[train:], classes)
