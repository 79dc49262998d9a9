"""Tests of distsgd.data: loaders (on tiny files in the real formats), downloads, sharding.

Nothing here touches the network: an autouse fixture points both download URLs at a missing
file:// path and the cache at a temporary folder, and the download tests serve file:// URLs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distsgd import data
from distsgd.data import Dataset, cifar, fashion
from distsgd.errors import UsageError

pytestmark = pytest.mark.timeout(60)

FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # These models are tiny: intra-op threads only add overhead, and on a busy 2-core machine
    # their spin-waiting made a 0.3 s training loop take 9 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = (tmp_path / "no-such-server").as_uri()
    monkeypatch.setattr(fashion, "FASHION_URL", missing + "/")
    monkeypatch.setattr(cifar, "CIFAR10_URL", missing + "/cifar-10-binary.tar.gz")
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env-cache"))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


# --- tiny files in the real formats ---------------------------------------------------------------

def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes((0, 0, 8, array.ndim)) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _tiny_fashion(folder: Path, train: int = 12, test: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(test) % 10,
    }
    for name, array in arrays.items():
        _write_idx(folder / name, array)
    return arrays


def _write_cifar_batch(path: Path, records: int, rng: np.random.Generator) -> np.ndarray:
    raw = rng.integers(0, 256, (records, 3073)).astype(np.uint8)
    raw[:, 0] = np.arange(records) % 10
    path.parent.mkdir(parents=True, exist_ok=True)
    raw.tofile(path)
    return raw


def _tiny_cifar(folder: Path, records: int = 20) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    names = [*data.CIFAR10_TRAIN, data.CIFAR10_TEST]
    return [_write_cifar_batch(folder / name, records, rng) for name in names]


def _tar_gz(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        if symlink is not None:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


# --- names and folders ----------------------------------------------------------------------------

def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(UsageError, match=r"unknown dataset 'mnist'.*digits, fashion-mnist"):
        data.load("mnist")


def test_cache_dir_prefers_argument_then_env_then_home(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    assert data.cache_dir(tmp_path / "x") == tmp_path / "x"
    assert data.cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv(data.DATA_ENV)
    assert data.cache_dir() == Path.home() / ".cache" / "distsgd"


# --- digits and synthetic -------------------------------------------------------------------------

def test_digits_shapes_range_and_split() -> None:
    ds = data.load("digits")
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.x_train.shape == (1438, 1, 8, 8) and ds.x_test.shape == (359, 1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0
    assert set(ds.y_test.tolist()) == set(range(10))
    again = data.load("digits")
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)


def test_synthetic_shapes_determinism_and_learnability() -> None:
    ds = data.load("synthetic")
    assert ds.input_shape == (32,) and ds.num_classes == 10
    assert ds.x_train.shape == (2000, 32) and ds.x_test.shape == (500, 32)
    assert torch.equal(ds.x_train, data.load("synthetic").x_train)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):  # full-batch steps: about 0.5 s
        opt.zero_grad()
        nn.functional.cross_entropy(model(ds.x_train), ds.y_train).backward()
        opt.step()
    accuracy, _ = data.evaluate(model, ds)
    assert accuracy > 0.9


# --- Fashion-MNIST --------------------------------------------------------------------------------

@pytest.mark.skipif(not FASHION_SYSTEM.is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed (CI installs it)")
def test_fashion_mnist_from_debian_folder(tmp_path: Path) -> None:
    ds = data.load("fashion-mnist", data_dir=tmp_path, download=False)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and float(ds.x_train.max()) == 1.0
    assert ds.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first labels
    assert ds.y_test.bincount().tolist() == [1000] * 10


def test_fashion_mnist_from_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fashion, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    arrays = _tiny_fashion(tmp_path / "cache" / "fashion-mnist")
    ds = data.load("fashion-mnist", data_dir=tmp_path / "cache", download=False)
    assert ds.input_shape == (1, 28, 28)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (6, 1, 28, 28)
    expected = torch.tensor(arrays["t10k-images-idx3-ubyte.gz"], dtype=torch.float32) / 255
    assert torch.allclose(ds.x_test[:, 0], expected)
    assert ds.y_train.tolist() == (np.arange(12) % 10).tolist()


def test_fashion_mnist_uses_env_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fashion, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    _tiny_fashion(tmp_path / "env-cache" / "fashion-mnist")
    assert data.load("fashion-mnist", download=False).x_train.shape == (12, 1, 28, 28)


@pytest.mark.parametrize("damage", ["magic", "truncated", "not-gzip"])
def test_fashion_mnist_corrupt_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    damage: str) -> None:
    monkeypatch.setattr(fashion, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    folder = tmp_path / "fashion-mnist"
    _tiny_fashion(folder)
    victim = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(victim.read_bytes())
    if damage == "magic":
        victim.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))
    elif damage == "truncated":
        victim.write_bytes(gzip.compress(raw[:-5]))
    else:
        victim.write_bytes(raw)
    with pytest.raises(UsageError, match=r"corrupt idx file .*train-images"):
        data.load("fashion-mnist", data_dir=tmp_path, download=False)


def test_fashion_mnist_missing_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setattr(fashion, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    for allow in (False, True):  # True: the download from the missing file:// URL fails
        with pytest.raises(UsageError, match=r"apt-get install dataset-fashion-mnist") as err:
            data.load("fashion-mnist", data_dir=tmp_path / "cache", download=allow)
        assert str(tmp_path / "cache" / "fashion-mnist") in str(err.value)
        assert str(tmp_path / "absent") in str(err.value)


def test_fashion_mnist_download_verifies_and_caches(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setattr(fashion, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    server = tmp_path / "server"
    _tiny_fashion(server)
    monkeypatch.setattr(fashion, "FASHION_URL", server.as_uri() + "/")
    monkeypatch.setattr(fashion, "FASHION_FILES",
                        {f: _md5(server / f) for f in data.FASHION_FILES})
    ds = data.load("fashion-mnist", data_dir=tmp_path / "cache")
    assert ds.x_train.shape == (12, 1, 28, 28)
    assert sorted(p.name for p in (tmp_path / "cache" / "fashion-mnist").iterdir()) == sorted(
        data.FASHION_FILES)


# --- download and extraction ----------------------------------------------------------------------

def test_download_accepts_the_right_md5(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"distsgd" * 1000)
    dest = data.download(source.as_uri(), tmp_path / "cache" / "copy.bin", _md5(source))
    assert dest.read_bytes() == source.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]


def test_download_rejects_a_wrong_md5_and_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"distsgd")
    with pytest.raises(UsageError, match=r"checksum mismatch .*expected MD5 0{32}"):
        data.download(source.as_uri(), tmp_path / "cache" / "copy.bin", "0" * 32)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_failure_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"download of .* failed"):
        data.download((tmp_path / "nothing").as_uri(), tmp_path / "copy.bin", "0" * 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["../evil.txt", "ok/../../evil.txt", "/tmp/evil.txt", "link"])
def test_extract_rejects_unsafe_members(tmp_path: Path, bad: str) -> None:
    members = {"ok/good.txt": b"good"}
    if bad != "link":
        members[bad] = b"evil"
    archive = _tar_gz(tmp_path / "a.tar.gz", members, symlink="ok/link" if bad == "link" else None)
    with pytest.raises(UsageError, match=r"unsafe archive"):
        data.extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written
    assert not (tmp_path / "evil.txt").exists()


def test_extract_writes_regular_files(tmp_path: Path) -> None:
    archive = _tar_gz(tmp_path / "a.tar.gz", {"d/one.txt": b"1", "two.txt": b"22"})
    data.extract_tar(archive, tmp_path / "out")
    assert (tmp_path / "out" / "d" / "one.txt").read_bytes() == b"1"
    assert (tmp_path / "out" / "two.txt").read_bytes() == b"22"


# --- CIFAR-10 -------------------------------------------------------------------------------------

def test_cifar10_from_binary_batches(tmp_path: Path) -> None:
    raws = _tiny_cifar(tmp_path / "cifar10" / data.CIFAR10_FOLDER)
    ds = data.load("cifar10", data_dir=tmp_path, download=False)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.x_train.shape == (100, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    first = torch.tensor(raws[0][0, 1:].reshape(3, 32, 32), dtype=torch.float32) / 255
    assert torch.allclose(ds.x_train[0], first)  # record layout: label, then C, H, W
    assert ds.y_test.tolist() == (np.arange(20) % 10).tolist()


def test_cifar10_download_and_extract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    _tiny_cifar(staging / data.CIFAR10_FOLDER)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / data.CIFAR10_FOLDER, arcname=data.CIFAR10_FOLDER)
    monkeypatch.setattr(cifar, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(cifar, "CIFAR10_MD5", _md5(archive))
    ds = data.load("cifar10", data_dir=tmp_path / "cache")
    assert ds.x_train.shape == (100, 3, 32, 32)
    assert [p.name for p in (tmp_path / "cache" / "cifar10").iterdir()] == [data.CIFAR10_FOLDER]


def test_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"downloading is disabled.*cifar-10-binary.tar.gz"):
        data.load("cifar10", data_dir=tmp_path, download=False)
    with pytest.raises(UsageError, match=r"CIFAR-10 .*download of .* failed"):
        data.load("cifar10", data_dir=tmp_path)
    assert list((tmp_path / "cifar10").iterdir()) == []


def test_cifar10_corrupt_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar10" / data.CIFAR10_FOLDER
    _tiny_cifar(folder)
    (folder / data.CIFAR10_TEST).write_bytes(b"\x00" * 3000)
    with pytest.raises(UsageError, match=r"corrupt CIFAR-10 batch .*test_batch.bin"):
        data.load("cifar10", data_dir=tmp_path, download=False)


# --- sharding -------------------------------------------------------------------------------------

def _indexed(n: int) -> Dataset:
    """A data set whose labels are the sample indices, so batches show which samples they hold."""
    return Dataset("indexed", torch.arange(n, dtype=torch.float32)[:, None],
                   torch.arange(n), torch.zeros(1, 1), torch.zeros(1, dtype=torch.int64), n, (1,))


def _labels(stream: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int) -> list[int]:
    return torch.cat([y for _, y in itertools.islice(stream, steps)]).tolist()


def test_shards_are_disjoint_cover_and_balanced() -> None:
    shards = [set(data.shard_indices(103, w, 4, seed=5).tolist()) for w in range(4)]
    assert sorted(len(s) for s in shards) == [25, 26, 26, 26]
    assert set().union(*shards) == set(range(103)) and sum(map(len, shards)) == 103


def test_a_pass_visits_the_shard_once_in_a_new_order_each_time() -> None:
    ds = _indexed(100)
    seen = [_labels(data.batches(ds, w, 4, batch_size=5, seed=3), 10) for w in range(4)]
    for w, labels in enumerate(seen):
        first, second = labels[:25], labels[25:]
        assert sorted(first) == sorted(second) == sorted(data.shard_indices(100, w, 4, 3).tolist())
        assert first != second
    assert sorted(x for labels in seen for x in labels[:25]) == list(range(100))


def test_batches_keep_their_size_across_passes() -> None:
    stream = data.batches(_indexed(25), 0, 1, batch_size=10, seed=0)
    sizes = [len(y) for _, y in itertools.islice(stream, 5)]
    assert sizes == [10] * 5
    labels = _labels(data.batches(_indexed(25), 0, 1, batch_size=10, seed=0), 5)
    assert sorted(labels) == sorted(list(range(25)) * 2)


def test_batches_are_deterministic_and_ignore_global_rng() -> None:
    ds = data.load("digits")
    torch.manual_seed(1)
    np.random.seed(1)
    first = list(itertools.islice(data.batches(ds, 1, 3, 16, seed=7), 5))
    torch.manual_seed(2)
    np.random.seed(2)
    second = list(itertools.islice(data.batches(ds, 1, 3, 16, seed=7), 5))
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.dtype == torch.float32 and x1.shape == (16, 1, 8, 8)
    other_seed = _labels(data.batches(ds, 1, 3, 16, seed=8), 5)
    assert other_seed != torch.cat([y for _, y in first]).tolist()


def test_iid_sampling_draws_the_whole_set_differently_per_worker() -> None:
    ds = _indexed(100)
    streams = [_labels(data.batches(ds, w, 4, 10, seed=0, sampling="iid"), 10) for w in range(4)]
    assert all(sorted(s) == list(range(100)) for s in streams)
    assert len({tuple(s) for s in streams}) == 4


def test_batches_reject_bad_arguments() -> None:
    ds = _indexed(100)
    with pytest.raises(UsageError, match=r"unknown sampling 'random'.*shard, iid"):
        data.batches(ds, 0, 2, 10, seed=0, sampling="random")
    with pytest.raises(UsageError, match=r"batch_size=30 .*shard \(25 samples\)"):
        data.batches(ds, 3, 4, 30, seed=0)
    with pytest.raises(UsageError, match=r"worker=4 is out of range"):
        data.batches(ds, 4, 4, 10, seed=0)
    with pytest.raises(UsageError, match=r"batch_size=0"):
        data.batches(ds, 0, 4, 0, seed=0)



# --- evaluation -----------------------------------------------------------------------------------

def test_evaluate_uses_eval_mode_and_restores_it() -> None:
    ds = data.load("synthetic")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.5), nn.Linear(64, 10))
    first = data.evaluate(model, ds, batch_size=128)
    assert model.training
    assert data.evaluate(model, ds) == pytest.approx(first)  # dropout off: same result
    model.eval()
    data.evaluate(model, ds)
    assert not model.training
    accuracy, loss = first
    assert 0.0 <= accuracy <= 1.0 and loss > 0.0
