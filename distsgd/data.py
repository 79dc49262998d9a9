"""Datasets and sharding: the four data sets of the experiments and each worker's batch stream.

Every data set loads into memory as one `Dataset` of tensors: images as float32 in [0, 1] with
shape (N, C, H, W), labels as int64. Nothing is ever unpickled: Fashion-MNIST is read from its idx
files and CIFAR-10 from its binary version. Files are looked for on disk first; a download (only
when allowed) is checked against the published MD5 before it is kept::

    ds = load("digits")
    for x, y in itertools.islice(batches(ds, worker=0, workers=4, batch_size=32, seed=0), 100):
        ...
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from distsgd.errors import UsageError

DATASETS = ("digits", "fashion-mnist", "cifar10", "synthetic")
SAMPLINGS = ("shard", "iid")
DATA_ENV = "DISTSGD_DATA"
DEFAULT_CACHE = Path("~/.cache/distsgd")
DOWNLOAD_TIMEOUT = 60.0  # seconds without progress on a socket before a download gives up

# Debian's `dataset-fashion-mnist` package; a module constant so that tests can bypass it.
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# The MD5s published in zalandoresearch/fashion-mnist's README. Debian recompressed its copies, so
# they only apply to downloaded files; files found on disk are checked by parsing them instead.
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST = "test_batch.bin"

# Fixed seeds make the digits split and the synthetic set the same in every process and run.
SPLIT_SEED = 0
SYNTHETIC_SEED = 0


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


def load(name: str, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """Load data set `name` (one of `DATASETS`); `data_dir` overrides the cache folder."""
    if name == "digits":
        return _load_digits()
    if name == "synthetic":
        return _load_synthetic()
    if name == "fashion-mnist":
        return _load_fashion(cache_dir(data_dir), download)
    if name == "cifar10":
        return _load_cifar10(cache_dir(data_dir), download)
    raise UsageError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def cache_dir(data_dir: str | Path | None = None) -> Path:
    """The cache folder: `data_dir`, else `$DISTSGD_DATA`, else ~/.cache/distsgd."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def _unit(pixels: np.ndarray) -> np.ndarray:
    """Bytes 0..255 as float32 in [0, 1], without a float64 intermediate (CIFAR-10 would need
    1.2 GB for it)."""
    out = pixels.astype(np.float32)
    out /= 255.0
    return out


def _dataset(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
             y_test: np.ndarray, num_classes: int) -> Dataset:
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
    )


# --- digits and synthetic: generated or bundled, no files -----------------------------------------

def _load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), split 80/20 by a fixed permutation."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    bunch = load_digits()
    x = (bunch.images / 16.0).reshape(-1, 1, 8, 8)  # pixel values are counts 0..16
    y = bunch.target
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    test, train = order[: len(y) // 5], order[len(y) // 5:]
    return _dataset("digits", x[train], y[train], x[test], y[test], 10)


def _load_synthetic(classes: int = 10, features: int = 32, train: int = 2000,
                    test: int = 500) -> Dataset:
    """Gaussian blobs: one unit-variance cloud per class around a random center.

    A center spread of 0.8 leaves the classes overlapping a little: an MLP or logistic regression
    reaches about 98% test accuracy, so the task is learnable yet not trivially perfect.
    """
    rng = np.random.default_rng(SYNTHETIC_SEED)
    centers = rng.normal(0.0, 0.8, size=(classes, features))
    y = rng.permutation(np.arange(train + test) % classes)
    x = centers[y] + rng.normal(size=(train + test, features))
    return _dataset("synthetic", x[:train], y[:train], x[train:], y[train:], classes)


# --- downloads ------------------------------------------------------------------------------------

def download(url: str, dest: str | Path, md5: str, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """Fetch `url` into `dest` and keep it only if its MD5 is `md5`.

    The bytes go to a temporary file beside `dest`, renamed into place once verified, so an
    interrupted or corrupt download never leaves a file that looks complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _copy_url(url, out, timeout)
        if actual != md5.lower():
            raise UsageError(f"checksum mismatch for {url}: expected MD5 {md5}, got {actual}; "
                             "the file was discarded")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _copy_url(url: str, out: BinaryIO, timeout: float) -> str:
    """Stream `url` into the binary file `out`; return the MD5 hex digest of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, ValueError) as err:  # URLError and socket timeouts are OSErrors
        raise UsageError(f"download of {url} failed: {err}") from err
    return digest.hexdigest()


# --- Fashion-MNIST: idx files ---------------------------------------------------------------------

def _load_fashion(cache: Path, allow_download: bool) -> Dataset:
    folder = _find_fashion(cache, allow_download)
    x_train = _read_idx(folder / "train-images-idx3-ubyte.gz", ndim=3)
    y_train = _read_idx(folder / "train-labels-idx1-ubyte.gz", ndim=1)
    x_test = _read_idx(folder / "t10k-images-idx3-ubyte.gz", ndim=3)
    y_test = _read_idx(folder / "t10k-labels-idx1-ubyte.gz", ndim=1)
    for images, labels, part in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        _check_labelled(images, labels, 10, f"fashion-mnist {part} files in {folder}")
    return _dataset("fashion-mnist", _unit(x_train[:, None]), y_train,
                    _unit(x_test[:, None]), y_test, 10)


def _find_fashion(cache: Path, allow_download: bool) -> Path:
    """The first folder holding all four files: Debian's, then the cache (downloading into it)."""
    target = cache / "fashion-mnist"
    for folder in (FASHION_SYSTEM_DIR, target):
        if all((folder / f).is_file() for f in FASHION_FILES):
            return folder
    reason = "downloading is disabled"
    if allow_download:
        try:
            for name, md5 in FASHION_FILES.items():
                if not (target / name).is_file():
                    download(FASHION_URL + name, target / name, md5)
            return target
        except UsageError as err:
            reason = str(err)
    raise UsageError(
        f"Fashion-MNIST not found in {FASHION_SYSTEM_DIR} or {target}, and {reason}. "
        "Install it with `apt-get install dataset-fashion-mnist`, or put the files "
        f"{', '.join(FASHION_FILES)} into {target} (or set {DATA_ENV} to another cache folder)")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a gzipped idx file of unsigned bytes (the MNIST format) with `ndim` dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise UsageError(f"corrupt idx file {path}: {err}") from err
    # magic: two zero bytes, type code 0x08 (unsigned byte), number of dimensions
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes((0, 0, 8, ndim)):
        raise UsageError(f"corrupt idx file {path}: expected the magic number of a {ndim}-d "
                         f"unsigned-byte array (0x0000080{ndim}), got 0x{raw[:4].hex()}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise UsageError(f"corrupt idx file {path}: header says shape {shape} "
                         f"({math.prod(shape)} bytes) but {data.size} bytes follow")
    return data.reshape(shape)


def _check_labelled(x: np.ndarray, y: np.ndarray, num_classes: int, what: str) -> None:
    if len(x) != len(y) or len(y) == 0:
        raise UsageError(f"corrupt {what}: {len(x)} images but {len(y)} labels")
    if y.max() >= num_classes:
        raise UsageError(f"corrupt {what}: label {int(y.max())} outside 0..{num_classes - 1}")


# --- CIFAR-10: the binary version -----------------------------------------------------------------

def _load_cifar10(cache: Path, allow_download: bool) -> Dataset:
    folder = _find_cifar10(cache, allow_download)
    train = [_read_cifar_batch(folder / f) for f in CIFAR10_TRAIN]
    x_test, y_test = _read_cifar_batch(folder / CIFAR10_TEST)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return _dataset("cifar10", _unit(x_train), y_train, _unit(x_test), y_test, 10)


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


def extract_tar(archive: str | Path, dest: str | Path) -> None:
    """Extract the regular files and folders of a .tar.gz into `dest`, refusing unsafe members.

    Every member is checked before anything is written: absolute paths, `..` components, links and
    device files are rejected, so an archive cannot write outside `dest`.
    """
    dest = Path(dest)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            for member in members:
                _extract_member(tar, member, dest)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UsageError(f"cannot extract {archive}: {err}") from err


def _check_member(member: tarfile.TarInfo, archive: str | Path) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise UsageError(f"unsafe archive {archive}: member {member.name!r} leaves the folder")
    if not (member.isfile() or member.isdir()):
        raise UsageError(f"unsafe archive {archive}: member {member.name!r} is not a regular "
                         "file or folder")


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    target = dest.joinpath(*PurePosixPath(member.name).parts)
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    assert source is not None  # regular files always have contents
    with source, open(target, "wb") as out:
        while chunk := source.read(1 << 20):
            out.write(chunk)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR-10 binary batch: records of 1 label byte then 3072 pixel bytes (C, H, W)."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = 1 + 3 * 32 * 32
    if raw.size == 0 or raw.size % record:
        raise UsageError(f"corrupt CIFAR-10 batch {path}: {raw.size} bytes is not a whole number "
                         f"of {record}-byte records")
    records = raw.reshape(-1, record)
    labels, images = records[:, 0], records[:, 1:].reshape(-1, 3, 32, 32)
    _check_labelled(images, labels, 10, f"CIFAR-10 batch {path}")
    return images, labels


# --- each worker's batches ------------------------------------------------------------------------

def shard_indices(n: int, worker: int, workers: int, seed: int) -> torch.Tensor:
    """Worker `worker`'s fixed share of `range(n)`: disjoint, covering, sizes within one.

    Every worker draws the same seeded permutation and takes every `workers`-th element of it.
    """
    order = np.random.default_rng(seed).permutation(n)
    return torch.from_numpy(order[worker::workers].copy())


def batches(dataset: Dataset, worker: int, workers: int, batch_size: int, seed: int,
            sampling: str = "shard", start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of (x, y) training batches for one worker, the same in any process.

    `sampling="shard"` gives each worker a disjoint shard of the train set (`shard_indices`);
    `"iid"` lets every worker sample the whole train set. Each pass visits the worker's samples in
    a new order drawn from (seed, worker, pass). Batches run on across the end of a pass, so every
    batch has exactly `batch_size` samples and none is dropped. `start` skips that many batches
    (a resumed run's data position) without drawing them.
    """
    _check_batches_args(worker, workers, batch_size, seed, sampling)
    n = len(dataset.y_train)
    pool = (shard_indices(n, worker, workers, seed) if sampling == "shard"
            else torch.arange(n))
    if batch_size > len(pool):
        what = f"worker {worker}'s shard" if sampling == "shard" else "the train set"
        raise UsageError(f"batch_size={batch_size} is larger than {what} ({len(pool)} samples); "
                         f"use batch_size <= {len(pool)} or fewer workers")
    if start < 0:
        raise UsageError(f"start={start} is out of range: it must be at least 0")
    return _stream(dataset, pool, batch_size, seed, worker, start)


def _check_batches_args(worker: int, workers: int, batch_size: int, seed: int,
                        sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise UsageError(f"unknown sampling {sampling!r}: choose one of {', '.join(SAMPLINGS)}")
    if workers < 1:
        raise UsageError(f"workers={workers} is out of range: it must be at least 1")
    if not 0 <= worker < workers:
        raise UsageError(f"worker={worker} is out of range: valid values are 0..{workers - 1}")
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size} is out of range: it must be at least 1")
    if seed < 0:
        raise UsageError(f"seed={seed} is out of range: it must be at least 0")


def _stream(dataset: Dataset, pool: torch.Tensor, batch_size: int, seed: int,
            worker: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Sample s of the stream is sample s mod P of pass s // P (P samples a pass), so batch
    # `start` begins inside pass start·B // P: begin there with that pass's remaining samples.
    epoch, offset = divmod(start * batch_size, len(pool))
    pending = torch.empty(0, dtype=torch.int64)
    if offset:
        order = np.random.default_rng([seed, worker, epoch]).permutation(len(pool))
        pending = pool[torch.from_numpy(order[offset:])]
        epoch += 1
    while True:
        while len(pending) < batch_size:
            # one explicitly seeded generator per pass: nothing touches the global RNG
            order = np.random.default_rng([seed, worker, epoch]).permutation(len(pool))
            pending = torch.cat([pending, pool[torch.from_numpy(order)]])
            epoch += 1
        idx, pending = pending[:batch_size], pending[batch_size:]
        yield dataset.x_train[idx], dataset.y_train[idx]


# --- evaluation -----------------------------------------------------------------------------------

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
