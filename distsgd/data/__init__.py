"""Datasets and sharding: the four data sets of the experiments and each worker's batch stream.

Every data set loads into memory as one `Dataset` of tensors: images as float32 in [0, 1] with
shape (N, C, H, W), labels as int64. Nothing is ever unpickled: Fashion-MNIST is read from its idx
files and CIFAR-10 from its binary version. Files are looked for on disk first; a download (only
when allowed) is checked against the published MD5 before it is kept::

    ds = load("digits")
    for x, y in itertools.islice(batches(ds, worker=0, workers=4, batch_size=32, seed=0), 100):
        ...

One concept a module: `dataset` (the `Dataset` and its test score), `generated` (digits and
synthetic, no files), `sources` (cache folder, checked download, safe extraction), `fashion` and
`cifar` (their file formats), `sharding` (each worker's batches). The names below are the public
ones; tests that redirect a download patch the module that owns the constant.
"""

from __future__ import annotations

from pathlib import Path

from distsgd.data.cifar import (
    CIFAR10_FOLDER,
    CIFAR10_MD5,
    CIFAR10_TEST,
    CIFAR10_TRAIN,
    CIFAR10_URL,
    load_cifar10,
)
from distsgd.data.dataset import Dataset, evaluate
from distsgd.data.fashion import FASHION_FILES, FASHION_SYSTEM_DIR, FASHION_URL, load_fashion
from distsgd.data.generated import SPLIT_SEED, SYNTHETIC_SEED, load_digits, load_synthetic
from distsgd.data.sharding import SAMPLINGS, batches, shard_indices
from distsgd.data.sources import (
    DATA_ENV,
    DEFAULT_CACHE,
    DOWNLOAD_TIMEOUT,
    cache_dir,
    download,
    extract_tar,
)
from distsgd.errors import UsageError

DATASETS = ("digits", "fashion-mnist", "cifar10", "synthetic")


def load(name: str, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """Load data set `name` (one of `DATASETS`); `data_dir` overrides the cache folder."""
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return load_synthetic()
    if name == "fashion-mnist":
        return load_fashion(cache_dir(data_dir), download)
    if name == "cifar10":
        return load_cifar10(cache_dir(data_dir), download)
    raise UsageError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


__all__ = [
    "CIFAR10_FOLDER",
    "CIFAR10_MD5",
    "CIFAR10_TEST",
    "CIFAR10_TRAIN",
    "CIFAR10_URL",
    "DATASETS",
    "DATA_ENV",
    "DEFAULT_CACHE",
    "DOWNLOAD_TIMEOUT",
    "FASHION_FILES",
    "FASHION_SYSTEM_DIR",
    "FASHION_URL",
    "SAMPLINGS",
    "SPLIT_SEED",
    "SYNTHETIC_SEED",
    "Dataset",
    "batches",
    "cache_dir",
    "download",
    "evaluate",
    "extract_tar",
    "load",
    "shard_indices",
]
