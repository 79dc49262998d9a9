"""Start a run: simulated workers, N local processes, or one process of a torchrun job.

`run(cfg)` is what `distsgd train` and `distsgd.train(...)` call. Whatever the backend, each worker
runs `train.worker_loop`; only the communicator and the observer differ.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distsgd import data
from distsgd.comm.base import Comm
from distsgd.comm.sim import Link, NetworkModel, SimWorld
from distsgd.errors import UsageError
from distsgd.evaluation import BudgetObserver, CollectiveObserver, Evaluator, SimObserver
from distsgd.metrics import RunFolder, default_run_dir, read_metrics, read_summary
from distsgd.train import Observer, RunConfig, WorkerResult, eval_steps, worker_loop


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    workers: list[WorkerResult] = field(default_factory=list)  # empty under torchrun


def run(cfg: RunConfig) -> RunResult:
    cfg.check()
    if cfg.backend == "torchrun":
        return _torchrun(cfg)
    dataset = data.load(cfg.dataset, cfg.data_dir)  # fails early, before any worker starts
    folder = _prepare(cfg)
    if cfg.backend == "sim":
        results = _simulate(cfg, dataset, folder)
    else:
        from distsgd import launch

        results = launch.launch(_process_entry, cfg.world_size(), args=(cfg, str(folder.path)),
                                comm_timeout=cfg.timeout)
    # summary.json was written once, by the last evaluation: by then every worker's last update
    # has been applied, so its staleness figures equal the servers' own (tests check it).
    return RunResult(folder.path, read_summary(folder.path), read_metrics(folder.path), results)


def _prepare(cfg: RunConfig) -> RunFolder:
    algorithm = cfg.make_algorithm()
    for warning in algorithm.validate(cfg.workers, cfg.learning_rate):
        print(f"warning: {warning}", file=sys.stderr)
    folder = RunFolder(cfg.out or default_run_dir(cfg.algorithm))
    folder.write_config({**cfg.to_json(), "out": str(folder.path)})
    folder.start_metrics()
    return folder


def _simulate(cfg: RunConfig, dataset: data.Dataset, folder: RunFolder) -> list[WorkerResult]:
    # --link A:B:LATENCY:BANDWIDTH overrides both directions of one link (global ranks).
    links = {}
    for a, b, latency, bandwidth in cfg.links:
        links[(a, b)] = links[(b, a)] = Link(latency, bandwidth)
    world = SimWorld(cfg.world_size(), NetworkModel(cfg.latency, cfg.bandwidth, links))
    total = cfg.total_steps(dataset)
    evaluator = Evaluator(cfg, dataset, folder, total)
    evals = eval_steps(cfg, total)
    observer: Observer
    if cfg.make_algorithm().synchronous:
        observer = SimObserver(evaluator, cfg.workers, evals)
    else:
        observer = BudgetObserver(evaluator, cfg.workers, evals)
    bar = _progress(cfg, total, evaluator)

    def body(comm: Comm) -> WorkerResult:
        on_step = bar.update_to if bar is not None and comm.rank == world.world_size - 1 else None
        return worker_loop(comm, cfg, dataset, observer, on_step)

    # Simulated workers share this process: one intra-op thread keeps runs bit-for-bit
    # reproducible and avoids oversubscribing the cores while one worker runs at a time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return world.run(body)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()


def _process_entry(comm: Comm, cfg: RunConfig, out: str | None) -> WorkerResult:
    """One real worker process (launched locally or by torchrun)."""
    dataset = data.load(cfg.dataset, cfg.data_dir)
    total = cfg.total_steps(dataset)
    first_worker = comm.world_size - cfg.workers  # servers, if any, take the first ranks
    evaluator = None
    bar = None
    if comm.rank == first_worker:
        folder = RunFolder(out) if out is not None else None
        evaluator = Evaluator(cfg, dataset, folder, total, started=time.perf_counter())
        bar = _progress(cfg, total, evaluator)
    observer = CollectiveObserver(evaluator, total, eval_steps(cfg, total))
    try:
        return worker_loop(comm, cfg, dataset, observer,
                           bar.update_to if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def _torchrun(cfg: RunConfig) -> RunResult:
    from distsgd import launch

    comm = launch.from_torchrun_env(timeout=cfg.timeout)
    if comm is None:
        raise UsageError("backend 'torchrun' needs the environment torchrun sets (RANK, "
                         "WORLD_SIZE, MASTER_ADDR, MASTER_PORT); start it with "
                         "torchrun ... -m distsgd train ..., or use --backend sim|processes")
    if comm.world_size != cfg.world_size():
        raise UsageError(f"torchrun started {comm.world_size} processes but --workers "
                         f"{cfg.workers} with {cfg.algorithm} needs {cfg.world_size()}")
    first_worker = comm.world_size - cfg.workers
    folder = _prepare(cfg) if comm.rank == first_worker else None
    try:
        result = _process_entry(comm, cfg, str(folder.path) if folder else None)
    finally:
        launch.shutdown(comm)
    if folder is None:
        return RunResult(Path(), {}, [], [result])
    return RunResult(folder.path, read_summary(folder.path), read_metrics(folder.path), [result])


class _Bar:
    """A tqdm progress bar whose postfix shows the latest evaluation."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update_to(self, step: int) -> None:
        self.tqdm.update(step - self.tqdm.n)

    def show(self, rec: dict[str, Any]) -> None:
        self.tqdm.set_postfix(acc=f"{rec['test_accuracy']:.3f}",
                              MB=f"{rec['bytes_sent'] / 1e6:.1f}", refresh=False)

    def close(self) -> None:
        self.tqdm.close()


def _progress(cfg: RunConfig, total: int, evaluator: Evaluator) -> _Bar | None:
    if not cfg.progress:
        return None
    bar = _Bar(total)
    evaluator.listeners.append(bar.show)
    return bar
