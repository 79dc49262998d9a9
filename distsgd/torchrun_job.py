"""One process of a torchrun job: its defaults, its checks, and the run folder all ranks agree on.

torchrun starts every rank with the same command, so each works out alone what the job holds
(`torchrun_workers`: the world less the algorithm's servers) and checks the command against it.
Only the first training worker takes the run folder (it writes the run's files); every rank joins
the group first and hears whether that worked (`join`), so a refused folder ends every rank at
once with a line, not the other ranks after their timeout. `resume_command` is the command that
continues a stopped run, under torchrun a torchrun command.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from distsgd import algorithms
from distsgd.algorithms.base import Algorithm
from distsgd.comm.base import Comm
from distsgd.config import RunConfig
from distsgd.errors import (
    CheckpointError,
    DistSGDError,
    StorageError,
    UsageError,
    WorkerFailure,
)
from distsgd.metrics import RunFolder
from distsgd.roles import Roles

T = TypeVar("T")

# The errors a refused claim raises again on the ranks that did not make it (exit 2 or 1).
_REFUSALS: dict[str, type[DistSGDError]] = {
    "UsageError": UsageError, "StorageError": StorageError, "CheckpointError": CheckpointError}


def is_torchrun() -> bool:
    """Whether torchrun started this process (its environment variables are set)."""
    from distsgd.comm.torch import group

    return group.is_torchrun()


def torchrun_workers(algorithm: Algorithm) -> int | None:
    """The training workers a torchrun job holds: its processes (WORLD_SIZE) less the
    algorithm's servers (`distsgd train --workers`'s default there); None outside torchrun."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or "RANK" not in os.environ:
        return None
    return len(Roles.of_world(algorithm, int(world)).workers)


def with_default_workers(options: Mapping[str, Any]) -> dict[str, Any]:
    """`distsgd.train`'s options, with `workers` (when not given) under backend "torchrun" what
    the job holds, as `distsgd train` does; otherwise as given."""
    options = dict(options)
    if options.get("backend") != "torchrun" or "workers" in options:
        return options
    name = options.get("algorithm", RunConfig.algorithm)
    settings = options.get("hyperparameters", {})
    if not isinstance(name, str) or not isinstance(settings, dict):
        return options  # RunConfig.create names the bad option
    typed = {k: v for k, v in settings.items() if not isinstance(v, str)}
    text = {k: v for k, v in settings.items() if isinstance(v, str)}
    held = torchrun_workers(algorithms.create(name, text, **typed))
    if held is not None:
        options["workers"] = held
    return options


def check_world(cfg: RunConfig, resuming: bool) -> None:
    """The job's processes are the run's ranks (checked on every rank, before joining)."""
    if not is_torchrun():
        raise UsageError("backend 'torchrun' needs the environment torchrun sets (RANK, "
                         "WORLD_SIZE, MASTER_ADDR, MASTER_PORT); start it with "
                         "torchrun ... -m distsgd train ..., or use --backend sim|processes")
    world = int(os.environ["WORLD_SIZE"])
    if world == cfg.world_size():
        return
    if resuming:
        fits = f"the run's {cfg.world_size()} processes ({resume_command(cfg.out or '.', cfg)})"
    else:
        try:
            fits = f"--workers {torchrun_workers(cfg.make_algorithm())} (the default)"
        except UsageError as e:
            fits = f"none ({e})"
    raise UsageError(f"torchrun started {world} processes but --workers {cfg.workers} with "
                     f"{cfg.algorithm} needs {cfg.world_size()}; valid: {fits}")


def join(cfg: RunConfig, claim: Callable[[], RunFolder],
         body: Callable[[Comm, RunFolder | None], T]) -> tuple[RunFolder | None, T]:
    """This rank's part of the job: `claim()` takes the run folder on the first worker, then
    `body(comm, folder)` runs on every rank (folder: None but on the first worker). Returns the
    folder, released, and what `body` returned."""
    from distsgd.comm.torch import group

    first = cfg.roles().workers[0]
    # No communicator before the claim is settled: a refusal leaves no mailbox thread behind.
    group.join_torchrun(cfg.timeout, cfg.device)
    comm = None
    folder = None
    try:
        folder = _claim_for_all(claim, int(os.environ["RANK"]) == first, first, cfg.timeout)
        comm = group.from_torchrun_env(timeout=cfg.timeout, device=cfg.device)
        assert comm is not None  # join_torchrun above
        result = body(comm, folder)
    finally:
        try:
            group.shutdown(comm)  # None: no communicator yet, only the group is destroyed
        finally:
            if folder is not None:
                folder.release()
    return folder, result


def _claim_for_all(claim: Callable[[], RunFolder], mine: bool, first: int,
                   timeout: float) -> RunFolder | None:
    """`claim()` on the rank it is `mine` to; every rank learns whether it failed and then
    raises: that rank its own error, the others a line naming that rank."""
    from distsgd.comm.torch import group

    folder, error = None, None
    if mine:
        try:
            folder = claim()
        except Exception as e:  # told to the others, then raised here
            error = e
    told = group.tell_all(first, None if error is None else type(error).__name__, timeout)
    if error is not None:
        raise error
    if told is not None:
        raise _REFUSALS.get(told, WorkerFailure)(
            f"not started: rank {first} could not take the run folder (its own line says why)")
    return folder


def resume_command(out: str | os.PathLike[str], cfg: RunConfig | None = None) -> str:
    """The command that continues the run in `out` from its checkpoint. A torchrun run (`cfg`'s
    backend) is continued by a torchrun job of its size; on several machines, by the job's own
    torchrun command on each."""
    tail = f"train --resume {shlex.quote(str(out))}"
    if cfg is None or cfg.backend != "torchrun":
        return f"distsgd {tail}"
    world = cfg.world_size()
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) < world:
        return f"on every machine, torchrun with the job's options and -m distsgd {tail}"
    return f"torchrun --standalone --nproc-per-node {world} -m distsgd {tail}"
