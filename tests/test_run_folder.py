"""Run folders are never overwritten or shared (issue 12): an existing run or a file as --out is
refused, a running run's folder is locked (a killed run's lock is not), and a read-only or full
disk is one line naming the path, with the temporary checkpoint removed and what was written
before intact."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import distsgd
from distsgd import checkpoint, cli
from distsgd.checkpoint import files
from distsgd.errors import StorageError, UsageError
from distsgd.metrics import LOCK_FILE, RunFolder, read_metrics

pytestmark = pytest.mark.timeout(180)

TRAIN = ["train", "-a", "sgp", "--workers", "2", "--steps", "4", "--no-progress"]
SMALL = dict(algorithm="sgp", workers=2, steps=4)


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------- what --out may name
def test_an_existing_run_is_refused_and_left_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    assert cli.main([*TRAIN, "--out", str(out)]) == 0
    before = _files(out)
    capsys.readouterr()
    assert cli.main([*TRAIN, "--seed", "1", "--out", str(out)]) == 2
    err = _error(capsys)
    assert str(out) in err and "--overwrite" in err and "--resume" in err
    assert _files(out) == before
    with pytest.raises(UsageError, match="already holds a run"):
        distsgd.train(**SMALL, out=str(out))
    assert _files(out) == before


def test_overwrite_replaces_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    distsgd.train(**SMALL, checkpoint_every=2, stop_after=2, out=str(out))
    (out / "notes.txt").write_text("mine")
    result = distsgd.train(**SMALL, seed=3, overwrite=True, out=str(out))
    assert json.loads((out / "config.json").read_text())["seed"] == 3
    assert [m["step"] for m in read_metrics(out)] == [m["step"] for m in result.metrics]
    assert not (out / "checkpoint.pt").exists()  # the old run's, gone with it
    assert (out / "notes.txt").read_text() == "mine"  # not a run file: kept
    assert not (out / LOCK_FILE).exists()


def test_an_empty_folder_is_a_fresh_run(tmp_path: Path) -> None:
    assert distsgd.train(**SMALL, out=str(tmp_path)).summary["steps"] == 4


def test_a_file_as_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a-file"
    path.write_text("x")
    assert cli.main([*TRAIN, "--out", str(path)]) == 2
    assert "is a file, not a folder" in _error(capsys)
    assert cli.main(["compare", "-a", "sgp", "--steps", "2", "--out", str(path),
                     "--no-progress"]) == 2
    assert "is a file, not a folder" in _error(capsys)
    assert path.read_text() == "x"


# ------------------------------------------------------------------------------- the lock
def test_a_locked_folder_is_refused_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    holder = RunFolder.create(out)  # as a running run holds it (flock: per open file)
    try:
        assert cli.main([*TRAIN, "--out", str(out), "--overwrite"]) == 2
        err = _error(capsys)
        assert str(out) in err and f"process {os.getpid()}" in err
        with pytest.raises(UsageError, match="in use by another run"):
            RunFolder.open(out)
    finally:
        holder.release()
    assert not (out / LOCK_FILE).exists()
    assert cli.main([*TRAIN, "--out", str(out)]) == 0


def test_two_runs_on_one_folder_one_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "distsgd", *TRAIN[:-3], "--steps", "300", "--eval-every",
               "20", "--no-progress", "--out", str(out)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    ends = [(p.wait(timeout=150), p.stderr.read()) for p in runs if p.stderr is not None]
    assert sorted(code for code, _ in ends) == [0, 2], ends
    refused = next(err for code, err in ends if code == 2)
    assert str(out) in refused and ("in use by another run" in refused
                                    or "already holds a run" in refused)
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 300  # one run's lines, in order


def test_the_lock_of_a_killed_run_is_stale(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # A process that takes the lock as a run does and is killed (the kernel drops its flock).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from distsgd.metrics import RunFolder; "
         "RunFolder.create(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
         str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    with pytest.raises(UsageError, match=f"process {holder.pid}"):
        RunFolder.create(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)  # left behind
    assert distsgd.train(**SMALL, out=str(out)).summary["steps"] == 4
    assert not (out / LOCK_FILE).exists()


def test_resume_takes_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "run"
    distsgd.train(**SMALL, checkpoint_every=2, stop_after=2, out=str(out))
    before = _files(out)
    holder = RunFolder.open(out)
    try:
        with pytest.raises(UsageError, match="in use by another run"):
            distsgd.resume(out)
    finally:
        holder.release()
    assert _files(out) == before  # refused before anything changed
    assert distsgd.resume(out).summary["steps"] == 4


# --------------------------------------------------------------------- full and read-only disks
def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    real_write = files._Writer.write
    saves: list[int] = []

    def write(self: files._Writer, data: bytes) -> int:
        if len(saves) > 1:  # the second checkpoint meets a full disk
            assert self.file is not None
            self.file = _Full(self.file)
        return real_write(self, data)

    real_save = files.save

    def save(folder: str | Path, payload: dict[str, object]) -> Path:
        saves.append(int(payload["step"]))  # type: ignore[call-overload]
        return real_save(folder, payload)

    monkeypatch.setattr(files._Writer, "write", write)
    monkeypatch.setattr("distsgd.checkpoint.taking.save", save)
    code = cli.main(["train", "-a", "allreduce", "--workers", "2", "--steps", "12",
                     "--eval-every", "2", "--checkpoint-every", "4", "--out", str(out),
                     "--no-progress"])
    assert code == 1
    err = _error(capsys)
    assert f"cannot write {out / 'checkpoint.pt'}: No space left on device" in err
    assert saves == [4, 8]
    assert not (out / "checkpoint.pt.tmp").exists()
    assert checkpoint.load(out)[1]["step"] == 4  # the previous checkpoint, whole
    assert [m["step"] for m in read_metrics(out)] == [0, 2, 4, 6, 8]
    monkeypatch.undo()  # space again: the run resumes from it and finishes
    assert distsgd.resume(out).summary["steps"] == 12


class _Full:
    """A file on a full disk: every write fails."""

    def __init__(self, file: object) -> None:
        self.file = file

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        pass


def test_a_failed_metrics_line_is_cut_off(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path)
    try:
        folder.start_metrics()
        folder.append_metrics({"step": 0})
        with pytest.raises(StorageError, match=r"metrics\.jsonl: No space left"):
            _append_failing(folder)
        assert read_metrics(tmp_path) == [{"step": 0}]
        assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    finally:
        folder.release()


def _append_failing(folder: RunFolder) -> None:
    """Append a line whose write fails after part of it reached the file."""
    real_open = Path.open

    def opened(path: Path, *args: object, **kw: object) -> object:
        f = real_open(path, *args, **kw)  # type: ignore[call-overload]
        real_write = f.write

        def write(text: str) -> int:
            real_write(text[: len(text) // 2])
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        f.write = write
        return f

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Path, "open", opened)
        folder.append_metrics({"step": 1, "pad": "x" * 100})


def test_a_read_only_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    real_open = os.open

    def read_only(path: str | os.PathLike[str], flags: int, *args: int, **kw: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    assert cli.main([*TRAIN, "--out", str(out)]) == 1
    assert f"cannot write {out / LOCK_FILE}: Read-only file system" in _error(capsys)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at `path` (root only), unmounted afterwards."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_real_full_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _tmpfs(tmp_path / "disk", "96k") as disk:
        out = disk / "run"
        code = cli.main(["train", "-a", "allreduce", "--workers", "4", "--steps", "40",
                         "--checkpoint-every", "4", "--out", str(out), "--no-progress"])
        assert code == 1
        err = _error(capsys)
        assert str(out) in err and "No space left on device" in err
        assert not (out / "checkpoint.pt.tmp").exists() and not (out / LOCK_FILE).exists()
        assert read_metrics(out)[0]["step"] == 0  # what was written before is readable


def test_a_real_read_only_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        run = disk / "run"
        distsgd.train(**SMALL, out=str(run))
        remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True,
                                 text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        for argv in ([*TRAIN, "--out", str(disk / "new")],
                     [*TRAIN, "--out", str(run), "--overwrite"],
                     ["compare", "-a", "sgp", "--steps", "2", "--out", str(disk / "grid"),
                      "--no-progress"]):
            capsys.readouterr()
            assert cli.main(argv) == 1, argv
            err = _error(capsys)
            assert "Read-only file system" in err and str(disk) in err


def test_a_checkpoint_that_fails_otherwise_is_not_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(Exception) as caught:  # torch's own error, whatever it is
        files.save(tmp_path, {"bad": lambda: 0})  # cannot be pickled
    assert not isinstance(caught.value, StorageError)
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
