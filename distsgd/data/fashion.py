"""Fashion-MNIST from its idx files: Debian's package, else the cache, else a checked download.

The URL, the folder and the file list are module constants, so that tests can point them
elsewhere (`monkeypatch.setattr(distsgd.data.fashion, "FASHION_URL", ...)`).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from distsgd.data.dataset import Dataset, check_labelled, from_arrays, unit
from distsgd.data.sources import DATA_ENV, download
from distsgd.errors import UsageError

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


def load_fashion(cache: Path, allow_download: bool) -> Dataset:
    folder = _find_fashion(cache, allow_download)
    x_train = read_idx(folder / "train-images-idx3-ubyte.gz", ndim=3)
    y_train = read_idx(folder / "train-labels-idx1-ubyte.gz", ndim=1)
    x_test = read_idx(folder / "t10k-images-idx3-ubyte.gz", ndim=3)
    y_test = read_idx(folder / "t10k-labels-idx1-ubyte.gz", ndim=1)
    for images, labels, part in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        check_labelled(images, labels, 10, f"fashion-mnist {part} files in {folder}")
    return from_arrays("fashion-mnist", unit(x_train[:, None]), y_train,
                       unit(x_test[:, None]), y_test, 10)


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


def read_idx(path: Path, ndim: int) -> np.ndarray:
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
    values = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != math.prod(shape):
        raise UsageError(f"corrupt idx file {path}: header says shape {shape} "
                         f"({math.prod(shape)} bytes) but {values.size} bytes follow")
    return values.reshape(shape)
