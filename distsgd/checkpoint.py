"""Checkpoints: every piece of a run's state as plain tensors, lists, dicts and numbers.

A checkpoint is one file, ``RUN/checkpoint.pt``, written atomically (``checkpoint.pt.tmp``, fsync,
``os.replace``: the previous one stays until the new one is complete) and read back with
``torch.load(..., weights_only=True)``, so loading one never runs code. What it holds and when it
is taken: docs/checkpoints.md.

`capture` / `restore` walk an algorithm's state object generically (dataclasses, tensors, numbers,
containers, numpy generators, and objects that define ``checkpoint_state`` /
``restore_checkpoint_state``), so most algorithms need no code of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distsgd.comm.base import Group
from distsgd.errors import CheckpointError

if TYPE_CHECKING:
    from distsgd.algorithms.base import WorkerContext
    from distsgd.comm.sim import SimWorld
    from distsgd.evaluation import Evaluator

FORMAT = 1
FILE = "checkpoint.pt"
# Options that cannot change a run's results; everything else must match to resume.
NEUTRAL = ("out", "progress", "stop_after", "data_dir")
_GENERATOR = "numpy_generator"


# --------------------------------------------------------------------- state as plain data
def capture(value: Any) -> Any:
    """A copy of `value` made of tensors, numbers, strings and containers only."""
    if isinstance(value, torch.Tensor):  # on the CPU: a checkpoint loads on any machine
        return value.detach().cpu().clone()
    if isinstance(value, np.random.Generator):
        return {_GENERATOR: value.bit_generator.state}
    if hasattr(value, "checkpoint_state"):
        return value.checkpoint_state()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Groups are structure, rebuilt by the algorithm's init on every rank: not state.
        return {f.name: capture(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not isinstance(getattr(value, f.name), Group)}
    if isinstance(value, dict):
        return {k: capture(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(capture(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return set(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__}: give it checkpoint_state() and "
                    "restore_checkpoint_state(), or override the algorithm's state_dict")


def restore(current: Any, saved: Any) -> Any:
    """`current` with the values of `saved` (from `capture`); returns the restored object."""
    if isinstance(current, np.random.Generator):
        current.bit_generator.state = saved[_GENERATOR]
        return current
    if isinstance(saved, torch.Tensor):  # back onto the device of the tensor it replaces
        device = current.device if isinstance(current, torch.Tensor) else saved.device
        return saved.to(device, copy=True)
    if hasattr(current, "restore_checkpoint_state"):
        current.restore_checkpoint_state(saved)
        return current
    if dataclasses.is_dataclass(current) and not isinstance(current, type):
        for name, value in saved.items():
            setattr(current, name, restore(getattr(current, name), value))
        return current
    if isinstance(saved, dict):
        old = current if isinstance(current, dict) else {}
        return {k: restore(old.get(k), v) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        before = list(current) if isinstance(current, (list, tuple)) else []
        before += [None] * (len(saved) - len(before))
        items = [restore(c, s) for c, s in zip(before, saved, strict=False)]
        return tuple(items) if isinstance(current, tuple) else items
    if isinstance(saved, set):
        return set(saved)
    return saved


# Sent between ranks (gathering a checkpoint on real processes) without pickle: a JSON skeleton
# of the containers and numbers, then the tensors' raw bytes, each checked against the skeleton.
_WIRE_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


def to_bytes(value: Any) -> torch.Tensor:
    """`capture`'s output as one uint8 tensor: 8 bytes of skeleton length, the JSON skeleton,
    then every tensor's bytes in order."""
    tensors: list[torch.Tensor] = []
    skeleton = json.dumps(_encode(value, tensors)).encode()
    parts = [torch.tensor(list(len(skeleton).to_bytes(8, "little")), dtype=torch.uint8),
             torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)]
    parts += [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    return torch.cat(parts)


def from_bytes(blob: torch.Tensor) -> Any:
    """The value `to_bytes` encoded; `CheckpointError` for anything malformed."""
    raw = blob.numpy().tobytes()
    size = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 or size > len(raw) - 8:
        raise CheckpointError(f"a checkpoint message of {len(raw)} bytes is malformed")
    cursor = [8 + size]
    try:
        value = _decode(json.loads(raw[8: 8 + size]), raw, cursor)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"a checkpoint message is malformed: {type(e).__name__}") from None
    if cursor[0] != len(raw):
        raise CheckpointError("a checkpoint message has bytes its skeleton does not account for")
    return value


def _encode(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        if str(value.dtype).removeprefix("torch.") not in _WIRE_DTYPES:
            raise TypeError(f"cannot send a {value.dtype} tensor in a checkpoint")
        tensors.append(value)
        return {"t": [str(value.dtype).removeprefix("torch."), list(value.shape)]}
    if isinstance(value, dict):
        return {"d": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    for tag, kind in (("l", list), ("u", tuple), ("s", set)):
        if isinstance(value, kind):
            return {tag: [_encode(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot send a {type(value).__name__} in a checkpoint")


def _decode(node: Any, raw: bytes, cursor: list[int]) -> Any:
    if not isinstance(node, dict):
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise CheckpointError(f"a checkpoint message holds an unexpected {type(node).__name__}")
    if len(node) != 1 or next(iter(node)) not in ("t", "d", "l", "u", "s"):
        raise CheckpointError("a checkpoint message holds an unknown container")
    (tag, body), = node.items()
    if tag == "t":
        return _decode_tensor(body, raw, cursor)
    if not isinstance(body, list):
        raise CheckpointError("a checkpoint message holds a malformed container")
    if tag == "d":
        if not all(isinstance(p, list) and len(p) == 2 for p in body):
            raise CheckpointError("a checkpoint message holds a malformed dict")
        pairs = [(_decode(k, raw, cursor), _decode(v, raw, cursor)) for k, v in body]
        if not all(k is None or isinstance(k, (bool, int, float, str)) for k, _ in pairs):
            raise CheckpointError("a checkpoint message holds a dict with unhashable keys")
        return dict(pairs)
    items = [_decode(v, raw, cursor) for v in body]
    return {"l": list, "u": tuple, "s": set}[tag](items)


def _decode_tensor(body: Any, raw: bytes, cursor: list[int]) -> torch.Tensor:
    ok = (isinstance(body, list) and len(body) == 2 and body[0] in _WIRE_DTYPES
          and isinstance(body[1], list)
          and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in body[1]))
    if not ok:
        raise CheckpointError(f"a checkpoint message holds a malformed tensor header {body!r:.80}")
    dtype, shape = _WIRE_DTYPES[body[0]], body[1]
    numel = 1
    for n in shape:
        numel *= n
    size = numel * torch.empty(0, dtype=dtype).element_size()
    start = cursor[0]
    if start + size > len(raw):
        raise CheckpointError("a checkpoint message is shorter than its tensors")
    cursor[0] = start + size
    if not size:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(raw[start: start + size]), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape).clone()


# ------------------------------------------------------------------------- the file
def save(folder: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as FOLDER/checkpoint.pt atomically (temporary file, fsync, rename)."""
    path = Path(folder, FILE)
    tmp = path.with_name(FILE + ".tmp")
    with tmp.open("wb") as f:
        torch.save({"format": FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
    if not isinstance(saved["config"], dict) or not isinstance(saved["workers"], list):
        raise CheckpointError(f"{path} is damaged: its config or workers are of the wrong type")
    check_same_run(saved["config"], config, path)
    return config, saved


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config as JSON would hold it, without the options that cannot change results."""
    from distsgd.metrics import _clean

    plain = json.loads(json.dumps(_clean(config)))
    return {k: v for k, v in plain.items() if k not in NEUTRAL}


def check_same_run(saved: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    a, b = comparable(saved), comparable(config)
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
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept


# ------------------------------------------------------------- taking them during a run
class Checkpoints:
    """When a run is checkpointed, what goes into it, and who writes it (the observers call it).

    In the simulator every worker parks at the checkpoint (`SimWorld.hold`) and the last one to
    arrive reads every rank's state in place; on real processes the workers meet in a barrier,
    worker 0 fetches the servers' shards, and one all-reduce gathers every worker's state to the
    first worker, which writes. `folder` is None on the ranks that do not write.
    """

    def __init__(self, config: dict[str, Any], folder: Path | None, steps: set[int],
                 stop_after: int | None, evaluator: Evaluator | None,
                 world: SimWorld | None = None, resume: dict[str, Any] | None = None) -> None:
        self.config, self.folder, self.steps, self.stop_after = config, folder, steps, stop_after
        self.evaluator, self.world, self.resume = evaluator, world, resume
        self.captures: dict[int, Callable[[], dict[str, Any]]] = {}
        start = resume["step"] if resume is not None else 0
        self.done = {s for s in steps if s <= start}
        self.stopped = False
        self.observer_state: Callable[[], dict[str, Any]] = dict

    def register(self, index: int, capture: Callable[[], dict[str, Any]] | None) -> None:
        if capture is not None:
            self.captures[index] = capture

    def due(self, step: int) -> bool:
        return step in self.steps and step not in self.done

    def _finished(self, step: int) -> None:
        self.done.add(step)
        self.stopped = step == self.stop_after

    # ------------------------------------------------------------------ simulator
    def hold(self, ctx: WorkerContext, step: int) -> bool:
        """Park this simulated worker; once every worker is parked, the checkpoint of `step` is
        written. False: the world went quiet with a worker blocked (SSP's staleness bound waiting
        for a parked one), so nothing was written and the workers go on: try again later."""
        assert self.world is not None
        return self.world.hold(ctx.rank, lambda: self._write_sim(step), ctx.worker_ranks)

    def _write_sim(self, step: int) -> None:
        assert self.world is not None
        parts = [self.captures[i]() for i in sorted(self.captures)]
        self._write(step, parts, self.world.state_dict())

    def restore_sim(self, ctx: WorkerContext) -> None:
        """Park until every rank has rebuilt itself, then restore clocks, NICs, byte counters and
        messages in flight at once (their setup, the initial pulls, moved them)."""
        world, saved = self.world, self.resume
        assert world is not None and saved is not None
        if not world.hold(ctx.rank, lambda: world.load_state_dict(saved["world"]),
                          ctx.worker_ranks):
            raise RuntimeError("resume: a worker blocked during setup; the world was not restored")

    # -------------------------------------------------------------- real processes
    def gather(self, ctx: WorkerContext, step: int) -> None:
        """Collective over the workers at `step`: the first worker gathers and writes."""
        comm, n = ctx.comm, ctx.workers
        with comm.uncounted():
            # Everyone at `step`: no request to a server is outstanding, so worker 0 can read
            # the servers' shards (in `capture`) before anyone pushes again (the all-reduces
            # below wait for it).
            comm.barrier(group=ctx.workers_group)
            blob = to_bytes(self.captures[ctx.index]())
            sizes = torch.zeros(n, dtype=torch.float64)
            sizes[ctx.index] = blob.numel()
            comm.all_reduce_(sizes, group=ctx.workers_group)
            ends = torch.cumsum(sizes, 0).long().tolist()
            starts = [0, *ends[:-1]]
            gathered = torch.zeros(ends[-1], dtype=torch.uint8)
            gathered[starts[ctx.index]: ends[ctx.index]] = blob  # the others add zeros here
            comm.all_reduce_(gathered, group=ctx.workers_group)
        if self.folder is not None:
            parts = [from_bytes(gathered[a:b]) for a, b in zip(starts, ends, strict=True)]
            self._write(step, parts, None)
        else:
            self._finished(step)

    # ------------------------------------------------------------------- the file
    def _write(self, step: int, parts: list[dict[str, Any]], world: dict[str, Any] | None) -> None:
        servers = parts[0].pop("servers", [])
        for part in parts[1:]:
            part.pop("servers", None)
        evaluator = self.evaluator
        records = evaluator.records if evaluator is not None else []
        payload = {
            "config": self.config, "step": step, "workers": parts, "servers": servers,
            # the metrics lines a resumed run keeps: those written before this checkpoint
            "metrics_step": records[-1]["step"] if records else step,
            "world": world, "observer": self.observer_state(),
            "evaluator": None if evaluator is None else evaluator.state_dict(),
        }
        if self.folder is not None:
            save(self.folder, payload)
        self._finished(step)
