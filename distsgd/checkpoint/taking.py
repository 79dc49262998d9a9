"""Taking checkpoints during a run: when, what goes in, and who writes the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distsgd.checkpoint.files import save
from distsgd.checkpoint.wire import from_bytes, to_bytes

if TYPE_CHECKING:
    from distsgd.algorithms.context import WorkerContext
    from distsgd.comm.sim import SimWorld
    from distsgd.config import Schedule
    from distsgd.evaluation import Evaluator


class Checkpoints:
    """When a run is checkpointed, what goes into it, and who writes it (the observers call it).

    In the simulator every worker parks at the checkpoint (`SimWorld.hold`) and the last one to
    arrive reads every rank's state in place; on real processes the workers meet in a barrier,
    worker 0 fetches the servers' shards, and one all-reduce gathers every worker's state to the
    first worker, which writes. `folder` is None on the ranks that do not write.
    """

    def __init__(self, config: dict[str, Any], folder: Path | None, steps: Schedule,
                 stop_after: int | None, evaluator: Evaluator | None,
                 world: SimWorld | None = None, resume: dict[str, Any] | None = None) -> None:
        self.config, self.folder, self.steps, self.stop_after = config, folder, steps, stop_after
        self.evaluator, self.world, self.resume = evaluator, world, resume
        self.captures: dict[int, Callable[[], dict[str, Any]]] = {}
        # Checkpoints are taken in step order: the last one done (or resumed from) says which
        # are due, without listing a schedule that may hold 10^9 steps.
        self.last = resume["step"] if resume is not None else 0
        self.stopped = False
        self.observer_state: Callable[[], dict[str, Any]] = dict

    def register(self, index: int, capture: Callable[[], dict[str, Any]] | None) -> None:
        if capture is not None:
            self.captures[index] = capture

    def due(self, step: int) -> bool:
        return step in self.steps and step > self.last

    def next_due(self) -> int:
        """The next checkpoint step (0: none left)."""
        return self.steps.after(self.last) or 0

    def _finished(self, step: int) -> None:
        self.last = max(self.last, step)
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
