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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from distsgd import data, mixing, models
from distsgd.algorithms.base import WorkerContext
from distsgd.flat import FlatState
from distsgd.metrics import METRIC_FIELDS, RunFolder
from distsgd.train import Contribution, RunConfig


class Evaluator:
    """Turns aggregated worker state into metrics lines and, at the last step, the summary."""

    def __init__(self, cfg: RunConfig, dataset: data.Dataset, folder: RunFolder | None,
                 total_steps: int, started: float | None = None) -> None:
        self.cfg, self.dataset, self.folder, self.total = cfg, dataset, folder, total_steps
        self.started = time.perf_counter() if started is None else started
        torch.manual_seed(cfg.seed)
        self.model = models.build(cfg.model_name, dataset.input_shape, dataset.num_classes)
        self.flat = FlatState(self.model)
        self.records: list[dict[str, Any]] = []
        self.listeners: list[Any] = []  # callables given each record (the progress display)
        self.loss_sum, self.loss_count = 0.0, 0  # totals at the previous record

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
            "real_time_s": time.perf_counter() - self.started,
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
            "virtual_time_s": last["virtual_time_s"],
            # Throughput in the time that matters for the backend: modelled in the simulator.
            "samples_per_s": last["samples"] / elapsed if elapsed else None,
            **{k: v for k, v in last.items()
               if k not in METRIC_FIELDS and k != "bytes_sent_per_worker"},
        }


Snapshot = Callable[[], Contribution]


class StepObserver:
    """Each worker takes `total` steps and publishes at the evaluation steps (both backends)."""

    def __init__(self, total: int, evals: set[int]) -> None:
        self.total, self.evals = total, evals

    def begin(self, ctx: WorkerContext, snapshot: Snapshot) -> None:
        self.publish(0, ctx, snapshot())

    def take(self, ctx: WorkerContext, done: int) -> bool:
        return done < self.total

    def stepped(self, ctx: WorkerContext, done: int, snapshot: Snapshot) -> None:
        if done in self.evals:
            self.publish(done, ctx, snapshot())

    def publish(self, step: int, ctx: WorkerContext, c: Contribution) -> None:
        raise NotImplementedError


class SimObserver(StepObserver):
    """Collects every simulated worker's copy of step k; evaluates when the last one arrives."""

    def __init__(self, evaluator: Evaluator, workers: int, evals: set[int]) -> None:
        super().__init__(evaluator.total, evals)
        self.evaluator, self.workers = evaluator, workers
        self.pending: dict[int, dict[int, Contribution]] = {}

    def publish(self, step: int, ctx: WorkerContext, c: Contribution) -> None:
        got = self.pending.setdefault(step, {})
        got[ctx.index] = c
        if len(got) == self.workers:
            del self.pending[step]
            self.evaluator.record_all(step, [got[i] for i in range(self.workers)], None)


class BudgetObserver:
    """Asynchronous algorithms in the simulator: the workers share one budget of N × steps steps,
    so a fast worker takes more of them than a straggler, as it would on a real cluster. Every
    N × eval_every steps taken in all, the observer reads every worker's state in place (all other
    workers are suspended: a consistent cut, at no virtual time and no bytes)."""

    def __init__(self, evaluator: Evaluator, workers: int, evals: set[int]) -> None:
        self.evaluator, self.workers = evaluator, workers
        self.budget = workers * evaluator.total
        # The last evaluation is taken once every worker has stopped, not when the budget runs
        # out: workers still inside their last step would otherwise each trigger it again.
        self.marks = {workers * e for e in evals} - {self.budget}
        self.taken = 0
        self.snapshots: dict[int, Snapshot] = {}
        self.stopped: set[int] = set()

    def begin(self, ctx: WorkerContext, snapshot: Snapshot) -> None:
        self.snapshots[ctx.index] = snapshot
        if len(self.snapshots) == self.workers:
            self._record(ctx)

    def take(self, ctx: WorkerContext, done: int) -> bool:
        if self.taken < self.budget:
            self.taken += 1
            return True
        self.stopped.add(ctx.index)
        if len(self.stopped) == self.workers:
            self._record(ctx)
        return False

    def stepped(self, ctx: WorkerContext, done: int, snapshot: Snapshot) -> None:
        if self.taken in self.marks:
            self._record(ctx)

    def _record(self, ctx: WorkerContext) -> None:
        parts = [self.snapshots[i]() for i in range(self.workers)]
        self.evaluator.record_all(self.taken // self.workers, parts, ctx.comm.now())


class CollectiveObserver(StepObserver):
    """Aggregates the workers' publications with all-reduces; worker 0 evaluates."""

    def __init__(self, evaluator: Evaluator | None, total: int, evals: set[int]) -> None:
        super().__init__(total, evals)
        self.evaluator = evaluator  # only on worker 0

    def publish(self, step: int, ctx: WorkerContext, c: Contribution) -> None:
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
