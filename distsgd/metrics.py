"""What a run measures, and the run folder it is written to.

    RUN/config.json     everything needed to rerun the job
    RUN/metrics.jsonl   one JSON object per evaluation, appended (and flushed) as the run goes
    RUN/summary.json    the final figures
    RUN/run.lock        while the run goes: its lock, holding its pid (removed when it ends)

A run folder is never overwritten or shared: a new run refuses a folder that holds a run unless
told to overwrite it, and a run holds an exclusive `flock` on its folder's lock file for its whole
life, so a second run on it is refused. The kernel drops a flock when its holder dies, however it
dies, so a lock file a killed run left behind locks nothing. A write that fails (read-only, full
disk) raises `StorageError` naming the path, and leaves the files written before as they were.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distsgd.errors import StorageError, UsageError

# Fields every metrics line has (the run folder's format); algorithms may add more (staleness).
# real_time_s counts from the first training step; what came before is the summary's startup_s.
METRIC_FIELDS = ("step", "epoch", "samples", "real_time_s", "virtual_time_s", "train_loss",
                 "test_loss", "test_accuracy", "consensus_distance", "bytes_sent")
SUMMARY_FIELDS = ("algorithm", "hyperparameters", "backend", "workers", "steps", "epochs",
                  "test_accuracy", "test_loss", "train_loss", "consensus_distance", "bytes_sent",
                  "bytes_sent_per_worker", "real_time_s", "startup_s", "virtual_time_s",
                  "samples_per_s")
# The files that make a folder a run's (a checkpoint: `distsgd.checkpoint.FILE`), and those an
# overwrite removes with them (a failed compare cell's error, temporary files a kill left).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt")
_LEFTOVERS = ("error.txt", "config.json.tmp", "summary.json.tmp", "metrics.jsonl.tmp",
              "checkpoint.pt.tmp")
LOCK_FILE = "run.lock"


def unique_path(path: Path) -> Path:
    """`path`, or `path`-2, -3, ... if it exists: two runs started in the same second differ."""
    candidate, suffix = path, 1
    while candidate.exists():
        suffix += 1
        candidate = path.with_name(f"{path.name}-{suffix}")
    return candidate


def default_run_dir(algorithm: str, root: str | Path = "runs") -> Path:
    """A new, empty folder runs/<time>-<algorithm>[-N], made here: two runs started in the same
    second never get the same one (`mkdir` is atomic)."""
    path = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{algorithm}"
    for suffix in range(1, 10_000):
        candidate = path if suffix == 1 else path.with_name(f"{path.name}-{suffix}")
        try:
            with storing(candidate):
                candidate.mkdir(parents=True)
            return candidate
        except StorageError as e:
            if not isinstance(e.__cause__, FileExistsError):
                raise
    raise StorageError(f"cannot make a new run folder next to {path}: 10000 of them exist")


@contextlib.contextmanager
def storing(path: Path) -> Iterator[None]:
    """Turn an `OSError` while writing `path` into one line naming it (`StorageError`)."""
    try:
        yield
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from e


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with storing(path):
            tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk: give the space back
            tmp.unlink()
        raise


class RunFolder:
    """The files of one run. `create` and `open` also lock the folder for the run (`release`
    ends that); a plain `RunFolder(path)` writes into a folder that another process locked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock: FolderLock | None = None

    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False) -> RunFolder:
        """The folder of a new run, locked: made if missing; one that holds a run is refused
        (`UsageError`) unless `overwrite`, which removes that run's files (nothing else)."""
        folder = cls(path)
        if folder.path.exists() and not folder.path.is_dir():
            raise UsageError(f"out {str(folder.path)!r} is a file, not a folder; valid: a new "
                             "folder, or an empty one")
        with storing(folder.path):
            folder.path.mkdir(parents=True, exist_ok=True)
        folder.lock = FolderLock(folder.path)
        try:
            run = [name for name in RUN_FILES if (folder.path / name).exists()]
            if run and not overwrite:
                raise UsageError(
                    f"out {str(folder.path)!r} already holds a run (its {run[0]}); valid: a new "
                    f"folder, --overwrite (overwrite=True) to replace that run, or --resume "
                    f"{folder.path} to continue it")
            for name in (*run, *_LEFTOVERS):
                with storing(folder.path / name):
                    (folder.path / name).unlink(missing_ok=True)
        except BaseException:
            folder.release()
            raise
        return folder

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """An existing run's folder, locked (to resume it)."""
        folder = cls(path)
        folder.lock = FolderLock(folder.path)
        return folder

    def release(self) -> None:
        """End the run's hold on the folder (also done by the kernel if the process dies)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.path / "config.json", config)

    def start_metrics(self) -> None:
        with storing(self.metrics_path):
            self.metrics_path.write_text("")

    def append_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps(_clean(record)) + "\n"
        with storing(self.metrics_path), self.metrics_path.open("a") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError:
                # A full disk may have taken part of the line: cut it off, so the lines before
                # stay a valid file.
                with contextlib.suppress(OSError):
                    f.truncate(size)
                raise

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)


class FolderLock:
    """An exclusive `flock` on FOLDER/run.lock, held from construction until `release`.

    Taken without waiting: a folder locked by a live process raises `UsageError` naming the
    folder and that process. The file holds the holder's pid, for that message only; `release`
    removes it. A process that found the file and locked it just as the holder removed it
    would hold a lock on a deleted file, so the lock is only kept on the file the path names.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        for _ in range(100):  # each retry: the file was replaced between open and flock
            with storing(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited (PEP 446)
            if self._take(fd, folder):
                self.fd: int | None = fd
                return
        raise StorageError(f"cannot lock {self.path}: it keeps being replaced")

    def _take(self, fd: int, folder: Path) -> bool:
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise UsageError(f"out {str(folder)!r} is in use by another run (process "
                                 f"{holder}); valid: another folder, or wait until it "
                                 "ends") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(fd)
                return False
            with storing(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return True
        except BaseException:
            os.close(fd)
            raise

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # removed while locked: nobody else holds this file
            self.path.unlink()
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The metrics lines so far; a run still writing may have left its last line half written,
    which is skipped."""
    lines = [line for line in Path(path, "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


def read_summary(path: str | Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(Path(path, "summary.json").read_text())
    return summary
