"""CIFAR-10 from its binary version (never unpickled): the cache, else a checked download.

The URL and checksum are module constants, so that tests can point them elsewhere
(`monkeypatch.setattr(distsgd.data.cifar, "CIFAR10_URL", ...)`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distsgd.data.dataset import Dataset, check_labelled, from_arrays, unit
from distsgd.data.sources import DATA_ENV, download, extract_tar
from distsgd.errors import UsageError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST = "test_batch.bin"


def load_cifar10(cache: Path, allow_download: bool) -> Dataset:
    folder = _find_cifar10(cache, allow_download)
    train = [read_cifar_batch(folder / f) for f in CIFAR10_TRAIN]
    x_test, y_test = read_cifar_batch(folder / CIFAR10_TEST)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return from_arrays("cifar10", unit(x_train), y_train, unit(x_test), y_test, 10)


def _find_cifar10(cache: Path, allow_download: bool) -> Path:
    root = cache / "cifar10"
    folder = root / CIFAR10_FOLDER
    if _cifar10_complete(folder):
        return folder
    reason = _fetch_cifar10(root) if allow_download else "downloading is disabled"
    if not reason:
        return folder
    raise UsageError(
        f"CIFAR-10 (binary version) not found in {folder}, and {reason}. Download "
        f"{CIFAR10_URL} (MD5 {CIFAR10_MD5}) and extract it into {root}, "
        f"or set {DATA_ENV} to another cache folder")


def _fetch_cifar10(root: Path) -> str:
    """Download and extract the archive into `root`; return why files are missing ("" if none)."""
    archive = root / "cifar-10-binary.tar.gz"
    try:
        download(CIFAR10_URL, archive, CIFAR10_MD5)
        extract_tar(archive, root)
    except UsageError as err:
        return str(err)
    finally:
        archive.unlink(missing_ok=True)  # 160 MB that the extracted files duplicate
    if not _cifar10_complete(root / CIFAR10_FOLDER):
        return f"the archive from {CIFAR10_URL} did not contain {CIFAR10_FOLDER}/ as expected"
    return ""


def _cifar10_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (*CIFAR10_TRAIN, CIFAR10_TEST))


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR-10 binary batch: records of 1 label byte then 3072 pixel bytes (C, H, W)."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = 1 + 3 * 32 * 32
    if raw.size == 0 or raw.size % record:
        raise UsageError(f"corrupt CIFAR-10 batch {path}: {raw.size} bytes is not a whole number "
                         f"of {record}-byte records")
    records = raw.reshape(-1, record)
    labels, images = records[:, 0], records[:, 1:].reshape(-1, 3, 32, 32)
    check_labelled(images, labels, 10, f"CIFAR-10 batch {path}")
    return images, labels
