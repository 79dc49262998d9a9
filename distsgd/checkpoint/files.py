"""The checkpoint file of a run folder: written atomically, read back without running code.

``RUN/checkpoint.pt`` is written to ``checkpoint.pt.tmp``, fsynced and renamed (the previous one
stays until the new one is complete) and read with ``torch.load(..., weights_only=True)``; `load`
checks that it belongs to the folder's run before anything is resumed.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, cast

import torch

from distsgd.checkpoint.checks import check_shape
from distsgd.errors import CheckpointError, StorageError

FORMAT = 1
FILE = "checkpoint.pt"
# Options that cannot change a run's results; everything else must match to resume.
NEUTRAL = ("out", "progress", "stop_after", "data_dir", "overwrite")


def save(folder: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as FOLDER/checkpoint.pt atomically (temporary file, fsync, rename)."""
    path = Path(folder, FILE)
    tmp = path.with_name(FILE + ".tmp")
    writer = _Writer()
    try:
        with tmp.open("wb") as f:
            writer.file = f
            torch.save({"format": FORMAT, **payload}, cast(IO[bytes], writer))
            if writer.error is not None:
                raise writer.error
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # The previous checkpoint stays; the partial one would only hold the space.
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(e, OSError):
            raise
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from e
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


class _Writer:
    """The file torch.save writes into. A failed write (no space, read-only, quota) is kept
    and torch is told it succeeded: an exception raised across torch's C++ writer becomes a
    bare RuntimeError('[enforce fail ...] unexpected pos'), or crashes the process when the
    end of the archive fails too. `save` raises the kept error once torch is done."""

    def __init__(self) -> None:
        self.file: IO[bytes] | None = None
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        assert self.file is not None
        if self.error is None:
            try:
                self.file.write(data)
            except OSError as e:
                self.error = e
        return len(data)

    def flush(self) -> None:
        assert self.file is not None
        if self.error is None:
            try:
                self.file.flush()
            except OSError as e:
                self.error = e


def load(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, checkpoint) of a run folder, or `CheckpointError` saying what is wrong.

    Reads only: a folder that fails any check is left exactly as it was.
    """
    folder = Path(run_dir)
    config_path = folder / "config.json"
    if not folder.is_dir() or not config_path.is_file():
        raise CheckpointError(f"{folder} is not a run folder (it has no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{config_path} is not a valid config file: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("algorithm"), str):
        raise CheckpointError(f"{config_path} is not a distsgd run config (no algorithm)")
    path = folder / FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {FILE}: start the run with --checkpoint-every N "
                              "to be able to resume it")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is corrupt or truncated ({reason[:200]})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{path} has format {found!r}; this distsgd reads format {FORMAT}")
    keys = ("config", "step", "metrics_step", "workers", "servers", "world", "evaluator")
    missing = [k for k in keys if k not in saved]
    if missing:
        raise CheckpointError(f"{path} is incomplete: it has no {missing[0]!r}")
    check_shape(saved, path)
    check_same_run(saved["config"], config, path)
    return config, saved


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config as JSON would hold it, without the options that cannot change results."""
    from distsgd.metrics import _clean

    plain = json.loads(json.dumps(_clean(config)))
    return {k: v for k, v in plain.items() if k not in NEUTRAL}


def check_same_run(saved: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    try:
        a, b = comparable(saved), comparable(config)
    except (TypeError, ValueError, RecursionError) as e:  # a value JSON cannot hold
        raise CheckpointError(f"{path} is damaged: its config cannot be read ({e})") from None
    if a == b:
        return
    keys = sorted(set(a) | set(b), key=lambda k: (k != "algorithm", k != "hyperparameters", k))
    key = next(k for k in keys if a.get(k) != b.get(k))
    raise CheckpointError(f"{path} belongs to another run: its {key} is {a.get(key)!r}, the "
                          f"folder's config.json says {b.get(key)!r}")


def keep_metrics_through(folder: str | Path, step: int) -> list[dict[str, Any]]:
    """Drop the metrics lines past `step` (written after the last checkpoint); return the rest."""
    path = Path(folder, "metrics.jsonl")
    kept = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line the interrupted run left half written
        if isinstance(record, dict) and isinstance(record.get("step"), int) and (
                record["step"] <= step):
            kept.append(record)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    except OSError as e:  # metrics.jsonl stays as it was
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from e
    return kept
