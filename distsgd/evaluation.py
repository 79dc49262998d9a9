"""Evaluating a run without disturbing it: the consensus model, its accuracy, the drift.

An observer decides how long a worker trains and when its state is evaluated
(`train.worker_loop` asks it before and after every step):

- `SimObserver` (simulator, synchronous algorithms): every worker lives in this process, so it
  collects each worker's copy of step k and evaluates once the last one has arrived.
- `BudgetObserver` (simulator, asynchronous algorithms): a shared budget of steps, and evaluations
  at points of global progress, read in place from every worker.
- `CollectiveObserver` (real processes): two all-reduces over the workers at step k, outside the
  byte counts; worker 0 evaluates and writes. Real runs pause while worker 0 evaluates; their
  wall-clock figures include that pause.

In the simulator nothing an observer does blocks, takes virtual time or counts bytes, so evaluating
never changes a run.

The observers also decide when a run is checkpointed (`distsgd.checkpoint.Checkpoints`,
docs/checkpoints.md): at the boundary of step k for `StepObserver`s, at global progress k for
`BudgetObserver`; a resumed run's observers skip the evaluations already written.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from distsgd import data, mixing, models
from distsgd.algorithms.base import WorkerContext
from distsgd.checkpoint import Checkpoints
from distsgd.config import RunConfig, Schedule
from distsgd.errors import PeerDied, ProtocolError
from distsgd.flat import FlatState
from distsgd.metrics import METRIC_FIELDS, RunFolder
from distsgd.observer import Contribution


class Evaluator:
    """Turns aggregated worker state into metrics lines and, at the last step, the summary.

    Its clock (`real_time_s`) runs from the first step, once every worker has started (the
    observers call `start_clock`); what came before (spawn, rendezvous, loading the data and the
    models, the step-0 evaluation) is start-up, `startup_s`, counted from `launched` (a
    `time.time()`, maybe another process's; default: now)."""

    def __init__(self, cfg: RunConfig, dataset: data.Dataset, folder: RunFolder | None,
                 total_steps: int, launched: float | None = None) -> None:
        self.cfg, self.dataset, self.folder, self.total = cfg, dataset, folder, total_steps
        self.launched = time.time() if launched is None else launched
        self.started: float | None = None  # perf_counter() at the first step (`start_clock`)
        self.carried = 0.0  # real time before this invocation (a resumed run's)
        self.startup_s = 0.0  # start-up so far: earlier invocations', then this one's added
        torch.manual_seed(cfg.seed)
        self.model = models.build(cfg.model_name, dataset.input_shape, dataset.num_classes)
        self.flat = FlatState(self.model)
        self.records: list[dict[str, Any]] = []
        self.listeners: list[Any] = []  # callables given each record (the progress display)
        self.loss_sum, self.loss_count = 0.0, 0  # totals at the previous record

    def start_clock(self) -> None:
        """The first step is about to be taken: start-up ends and real time starts (once)."""
        if self.started is None:
            self.started = time.perf_counter()
            self.startup_s += max(0.0, time.time() - self.launched)

    def real_time(self) -> float:
        """Seconds of training so far: since the first step, plus a resumed run's earlier ones."""
        running = 0.0 if self.started is None else time.perf_counter() - self.started
        return self.carried + running

    def state_dict(self) -> dict[str, Any]:
        """The running totals a resumed run goes on from (docs/checkpoints.md)."""
        return {"loss_sum": self.loss_sum, "loss_count": self.loss_count,
                "real_time_s": self.real_time(), "startup_s": self.startup_s}

    def load_state_dict(self, saved: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """Go on from a checkpoint; `records` are the metrics lines kept up to it."""
        self.loss_sum, self.loss_count = saved["loss_sum"], saved["loss_count"]
        # Real time and start-up keep counting; checkpoints written before start-up was
        # measured have no startup_s (theirs is unknown: none is added).
        self.carried, self.startup_s = saved["real_time_s"], saved.get("startup_s", 0.0)
        self.records = list(records)

    def record_all(self, step: int, parts: list[Contribution], now: float | None) -> None:
        """Evaluate from every worker's contribution (in worker order: deterministic sums)."""
        consensus = mixing.weighted_average([p.evaluated for p in parts],
                                            [p.weight for p in parts])
        distance = mixing.consensus_distance([p.params.double() for p in parts])
        clocks = [p.clock for p in parts if p.clock is not None]
        if now is None and clocks:
            now = max(clocks)
        self.record(step, consensus, distance, sum(p.loss_sum for p in parts),
                    sum(p.loss_count for p in parts), [p.bytes_sent for p in parts], now,
                    parts[0].extra)

    def record(self, step: int, consensus: torch.Tensor, distance: float, loss_sum: float,
               loss_count: int, bytes_per_worker: list[int], virtual_time: float | None,
               extra: dict[str, Any]) -> None:
        """One metrics line; `loss_sum` and `loss_count` are totals since the start."""
        loss_sum, self.loss_sum = loss_sum - self.loss_sum, loss_sum
        loss_count, self.loss_count = loss_count - self.loss_count, loss_count
        self.flat.set_(consensus.to(self.flat.dtype))
        accuracy, test_loss = data.evaluate(self.model, self.dataset)
        samples = step * self.cfg.workers * self.cfg.batch_size
        rec = {
            "step": step,
            "epoch": samples / len(self.dataset.y_train),
            "samples": samples,
            "real_time_s": self.real_time(),
            "virtual_time_s": virtual_time,
            "train_loss": loss_sum / loss_count if loss_count else None,
            "test_loss": test_loss,
            "test_accuracy": accuracy,
            "consensus_distance": distance,
            "bytes_sent": int(sum(bytes_per_worker)),
            "bytes_sent_per_worker": [int(b) for b in bytes_per_worker],
            **extra,
        }
        self.records.append(rec)
        if self.folder is not None:
            self.folder.append_metrics(rec)
        for listener in self.listeners:
            listener(rec)
        if step == self.total and self.folder is not None:
            self.folder.write_summary(self.summary(rec))

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        elapsed = last["virtual_time_s"] if last["virtual_time_s"] is not None else last[
            "real_time_s"]
        train_loss = next((r["train_loss"] for r in reversed(self.records)
                           if r["train_loss"] is not None), None)
        return {
            "algorithm": cfg.algorithm,
            "hyperparameters": cfg.to_json()["hyperparameters"],
            "backend": cfg.backend,
            "workers": cfg.workers,
            "model": cfg.model_name,
            "dataset": cfg.dataset,
            "steps": last["step"],
            "epochs": last["epoch"],
            "test_accuracy": last["test_accuracy"],
            "test_loss": last["test_loss"],
            "train_loss": train_loss,
            "consensus_distance": last["consensus_distance"],
            "bytes_sent": last["bytes_sent"],
            "bytes_sent_per_worker": last["bytes_sent_per_worker"],
            "real_time_s": last["real_time_s"],
            "startup_s": self.startup_s,
            "virtual_time_s": last["virtual_time_s"],
            # Throughput in the time that matters for the backend: modelled in the simulator,
            # from the first step on real processes (start-up is not training).
            "samples_per_s": last["samples"] / elapsed if elapsed else None,
            **{k: v for k, v in last.items()
               if k not in METRIC_FIELDS and k != "bytes_sent_per_worker"},
        }


Snapshot = Callable[[], Contribution]
Capture = Callable[[], dict[str, Any]]


class StepObserver:
    """Each worker takes `total` steps and publishes at the evaluation steps (both backends).

    With `checkpoints` set, each worker is also checkpointed at the checkpoint steps: gathered by
    collectives on real processes (`checkpoint`), parked and read in place in the simulator.
    """

    def __init__(self, total: int, evals: Schedule) -> None:
        self.total, self.evals = total, evals
        self.checkpoints: Checkpoints | None = None

    def begin(self, ctx: WorkerContext, snapshot: Snapshot, capture: Capture | None = None) -> None:
        cp = self.checkpoints
        if cp is not None:
            cp.register(ctx.index, capture)
            if cp.resume is not None:  # step `cp.resume["step"]` was published before
                self.resumed(ctx)
                return
        self.publish(0, ctx, snapshot())

    def attach(self, checkpoints: Checkpoints) -> None:
        self.checkpoints = checkpoints

    def resumed(self, ctx: WorkerContext) -> None:
        """A resumed worker has rebuilt its state (real processes: nothing more to do)."""

    def take(self, ctx: WorkerContext, done: int) -> bool:
        return done < self.total and not (self.checkpoints is not None
                                           and self.checkpoints.stopped)

    def stepped(self, ctx: WorkerContext, done: int, snapshot: Snapshot) -> None:
        if done in self.evals:
            self.publish(done, ctx, snapshot())
        if self.checkpoints is not None and self.checkpoints.due(done):
            self.checkpoint(ctx, done)

    def checkpoint(self, ctx: WorkerContext, step: int) -> None:
        assert self.checkpoints is not None
        self.checkpoints.gather(ctx, step)

    def publish(self, step: int, ctx: WorkerContext, c: Contribution) -> None:
        raise NotImplementedError


class SimObserver(StepObserver):
    """Collects every simulated worker's copy of step k; evaluates when the last one arrives."""

    def __init__(self, evaluator: Evaluator, workers: int, evals: Schedule) -> None:
        super().__init__(evaluator.total, evals)
        self.evaluator, self.workers = evaluator, workers
        self.pending: dict[int, dict[int, Contribution]] = {}

    def resumed(self, ctx: WorkerContext) -> None:
        assert self.checkpoints is not None
        self.checkpoints.restore_sim(ctx)  # returns once every worker has rebuilt itself
        self.evaluator.start_clock()

    def checkpoint(self, ctx: WorkerContext, step: int) -> None:
        # Every worker parks after its step `step`, so no message is in flight (each step's
        # messages are received within the step); the last to park writes.
        assert self.checkpoints is not None
        if not self.checkpoints.hold(ctx, step):
            raise RuntimeError(f"checkpoint at step {step}: a synchronous worker was blocked")

    def publish(self, step: int, ctx: WorkerContext, c: Contribution) -> None:
        got = self.pending.setdefault(step, {})
        got[ctx.index] = c
        if len(got) == self.workers:
            del self.pending[step]
            self.evaluator.record_all(step, [got[i] for i in range(self.workers)], None)
            # Step 0: every worker has started (the first to step already has: a few ms).
            self.evaluator.start_clock()


class BudgetObserver:
    """Asynchronous algorithms in the simulator: the workers share one budget of N × steps steps,
    so a fast worker takes more of them than a straggler, as it would on a real cluster. Every
    N × eval_every steps taken in all, the observer reads every worker's state in place (all other
    workers are suspended: a consistent cut, at no virtual time and no bytes)."""

    def __init__(self, evaluator: Evaluator, workers: int, evals: Schedule) -> None:
        self.evaluator, self.workers = evaluator, workers
        self.budget = workers * evaluator.total
        # The last evaluation is taken once every worker has stopped, not when the budget runs
        # out: workers still inside their last step would otherwise each trigger it again.
        self.evals = evals  # at global progress N × e for each e in it, but the budget's end
        self.taken = 0
        self.recorded = -1  # the last mark evaluated: once each, whoever finishes a step first
        self.snapshots: dict[int, Snapshot] = {}
        self.stopped: set[int] = set()
        self.checkpoints: Checkpoints | None = None
        self.mark = 0  # the next checkpoint step (0: none)

    def attach(self, checkpoints: Checkpoints) -> None:
        """Checkpoint at global progress k (k × N steps taken in all), k a checkpoint step."""
        self.checkpoints = checkpoints
        self.mark = checkpoints.next_due()
        checkpoints.observer_state = lambda: {"taken": self.taken}
        if checkpoints.resume is not None:
            self.taken = self.recorded = checkpoints.resume["observer"]["taken"]

    def begin(self, ctx: WorkerContext, snapshot: Snapshot, capture: Capture | None = None) -> None:
        self.snapshots[ctx.index] = snapshot
        cp = self.checkpoints
        if cp is not None:
            cp.register(ctx.index, capture)
            if cp.resume is not None:
                cp.restore_sim(ctx)  # returns once every worker has rebuilt itself
                self.evaluator.start_clock()
                return
        if len(self.snapshots) == self.workers:
            self._record(ctx)
            self.evaluator.start_clock()  # every worker has started

    def take(self, ctx: WorkerContext, done: int) -> bool:
        cp, n = self.checkpoints, self.workers
        if cp is not None and cp.due(self.mark) and self.taken >= n * self.mark:
            # A quiescent point: each worker finishes its step and parks here; the last one
            # writes. Workers that would have gone on meanwhile now wait (docs/checkpoints.md).
            # Should one be blocked by a parked one instead (SSP), all go on a step and retry.
            if cp.hold(ctx, self.mark):
                self.mark = cp.next_due()
        if cp is not None and cp.stopped:
            return False
        if self.taken < self.budget:
            self.taken += 1
            return True
        self.stopped.add(ctx.index)
        if len(self.stopped) == self.workers:
            self._record(ctx)
        return False

    def stepped(self, ctx: WorkerContext, done: int, snapshot: Snapshot) -> None:
        n = self.workers
        at_mark = (self.taken % n == 0 and self.taken // n in self.evals
                   and self.taken != self.budget)
        if at_mark and self.taken > self.recorded:
            self.recorded = self.taken
            self._record(ctx)

    def _record(self, ctx: WorkerContext) -> None:
        parts = [self.snapshots[i]() for i in range(self.workers)]
        self.evaluator.record_all(self.taken // self.workers, parts, ctx.comm.now())


class CollectiveObserver(StepObserver):
    """Aggregates the workers' publications with all-reduces; worker 0 evaluates.

    With `reports` (``--on-failure continue``) each worker sends its publication to worker 0 on
    the communicator's reports channel instead: a collective can never complete once a worker has
    died, messages from the survivors can. Worker 0 then evaluates over the workers that reported
    and lists the dead (`Comm.deaths`) in ``failed_workers``. Every step is also noted
    (`Comm.note_step`) for the launcher, whose message names a dead worker's last step.
    """

    def __init__(self, evaluator: Evaluator | None, total: int, evals: Schedule,
                 reports: bool = False) -> None:
        super().__init__(total, evals)
        self.evaluator = evaluator  # only on worker 0
        self.reports = reports
        # worker index -> (loss sum, loss count, bytes) at its last report: a dead worker's
        # totals stay in the sums, so the loss since the previous record stays right.
        self.seen: dict[int, list[float]] = {}

    def begin(self, ctx: WorkerContext, snapshot: Snapshot, capture: Capture | None = None) -> None:
        super().begin(ctx, snapshot, capture)
        # Step 0's collectives waited for every worker to start (a resumed run: its own start).
        if self.evaluator is not None:
            self.evaluator.start_clock()

    def stepped(self, ctx: WorkerContext, done: int, snapshot: Snapshot) -> None:
        ctx.comm.note_step(done)
        super().stepped(ctx, done, snapshot)

    def publish(self, step: int, ctx: WorkerContext, c: Contribution) -> None:
        if self.reports:
            self._report(step, ctx, c)
            return
        n, size = ctx.workers, c.params.numel()
        states = torch.cat([c.params.double(), c.evaluated.double() * c.weight])
        scalars = torch.zeros(4 + n, dtype=torch.float64)
        with ctx.comm.uncounted():
            ctx.comm.all_reduce_(states, group=ctx.workers_group)
            mean = states[:size] / n
            scalars[:4] = torch.tensor([
                c.weight, c.loss_sum, c.loss_count,
                float(torch.linalg.vector_norm(c.params.double() - mean))])
            scalars[4 + ctx.index] = c.bytes_sent
            ctx.comm.all_reduce_(scalars, group=ctx.workers_group)
        if self.evaluator is not None:
            consensus = states[size:] / scalars[0]
            self.evaluator.record(step, consensus, float(scalars[3]) / n, float(scalars[1]),
                                  int(scalars[2]), [int(b) for b in scalars[4:]], c.clock,
                                  c.extra)

    def _report(self, step: int, ctx: WorkerContext, c: Contribution) -> None:
        comm = ctx.comm  # its reports channel: uncounted, apart from the algorithm's messages
        size = c.params.numel()
        mine = torch.cat([c.params.double(), c.evaluated.double() * c.weight, torch.tensor(
            [c.weight, c.loss_sum, c.loss_count, c.bytes_sent, step], dtype=torch.float64)])
        if self.evaluator is None:
            comm.send_report(mine, ctx.worker_ranks[0])
            return
        parts = {0: mine}
        for index, rank in enumerate(ctx.worker_ranks[1:], start=1):
            part = torch.empty_like(mine)
            with contextlib.suppress(PeerDied):  # it died: the survivors are evaluated
                comm.recv_report(part, rank)
                if int(part[-1]) != step:
                    raise ProtocolError(f"worker {index} (rank {rank}) reported step "
                                        f"{int(part[-1])} when step {step} was due")
                parts[index] = part
        stacked = torch.stack(list(parts.values()))
        weight = float(stacked[:, 2 * size].sum())
        mean = stacked[:, :size].mean(0)
        distance = float(torch.linalg.vector_norm(stacked[:, :size] - mean, dim=1).mean())
        self.seen.update({i: p[2 * size + 1:2 * size + 4].tolist() for i, p in parts.items()})
        totals = torch.tensor([self.seen.get(i, [0.0] * 3) for i in range(ctx.workers)])
        # When each died, on this record's clock (negative: before the first step).
        now, real_time = time.time(), self.evaluator.real_time()
        failed = [{"rank": r, "worker": ctx.worker_ranks.index(r), "last_step": last,
                   "real_time_s": round(real_time - (now - died), 3)}
                  for r, (last, died) in sorted(comm.deaths().items()) if r in ctx.worker_ranks]
        self.evaluator.record(step, stacked[:, size:2 * size].sum(0) / weight, distance,
                              float(totals[:, 0].sum()), int(totals[:, 1].sum()),
                              [int(b) for b in totals[:, 2]], c.clock,
                              {**c.extra, "failed_workers": failed})
