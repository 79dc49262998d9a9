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

from distsgd import checkpoint, data
from distsgd.checkpoint import Checkpoints
from distsgd.comm.base import Comm
from distsgd.comm.sim import Link, NetworkModel, SimWorld
from distsgd.config import RunConfig, checkpoint_steps, eval_steps
from distsgd.errors import UsageError
from distsgd.evaluation import BudgetObserver, CollectiveObserver, Evaluator, SimObserver
from distsgd.metrics import RunFolder, default_run_dir, read_metrics, read_summary
from distsgd.train import WorkerResult, worker_loop


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    workers: list[WorkerResult] = field(default_factory=list)  # empty under torchrun
    stopped_at: int | None = None  # the checkpoint step a --stop-after run stopped at


def run(cfg: RunConfig) -> RunResult:
    cfg.check()
    if cfg.backend == "torchrun":
        return _torchrun(cfg)
    dataset = data.load(cfg.dataset, cfg.data_dir)  # fails early, before any worker starts
    cfg.check_length(cfg.total_steps(dataset))
    return _start(cfg, dataset, _prepare(cfg), None)


def resume(run_dir: str | Path, *, progress: bool = False,
           stop_after: int | None = None) -> RunResult:
    """Continue the run in `run_dir` from its checkpoint, in the same folder: its config comes
    from the checkpoint (checked against config.json), and metrics.jsonl keeps the lines up to
    the checkpoint's step and goes on from there. `stop_after`: stop again at a later checkpoint.

    A folder that is not a run, has no checkpoint, or a damaged or foreign one raises
    `CheckpointError` and is left untouched.
    """
    _, saved = checkpoint.load(run_dir)
    options = {**saved["config"], "out": str(run_dir), "progress": progress,
               "stop_after": stop_after}
    cfg = RunConfig.create(**options)
    if cfg.backend == "torchrun":
        raise UsageError("resume: runs started under torchrun are resumed by starting torchrun "
                         "again; valid backends for --resume: sim, processes")
    if stop_after is not None and stop_after <= saved["step"]:
        raise UsageError(f"stop_after={stop_after} is not a checkpoint step after the "
                         f"checkpoint's step {saved['step']}: valid values are multiples of "
                         f"checkpoint_every={cfg.checkpoint_every} above it")
    dataset = data.load(cfg.dataset, cfg.data_dir)
    cfg.check_length(cfg.total_steps(dataset))
    checkpoint.keep_metrics_through(run_dir, saved["metrics_step"])  # the first change made
    # A summary from before (the run had finished, then was resumed from its last checkpoint)
    # would describe a run that is being redone: it is written again at the end.
    Path(run_dir, "summary.json").unlink(missing_ok=True)
    return _start(cfg, dataset, RunFolder(run_dir), saved)


def _start(cfg: RunConfig, dataset: data.Dataset, folder: RunFolder,
           saved: dict[str, Any] | None) -> RunResult:
    if cfg.backend == "sim":
        results = _simulate(cfg, dataset, folder, saved)
    else:
        from distsgd import launch

        # The servers and the evaluating worker are essential: their death ends any run.
        servers = cfg.world_size() - cfg.workers
        path = str(folder.path / checkpoint.FILE) if saved is not None else None
        results = launch.launch(_process_entry, cfg.world_size(),
                                args=(cfg, str(folder.path), path),
                                comm_timeout=cfg.timeout, on_failure=cfg.on_failure,
                                essential=range(servers + 1), device=cfg.device)
        results = [r for r in results if r is not None]  # None: a worker that died
    # summary.json was written once, by the last evaluation: by then every worker's last update
    # has been applied, so its staleness figures equal the servers' own (tests check it). A run
    # stopped at a checkpoint (--stop-after) has none yet.
    done = (folder.path / "summary.json").is_file()
    return RunResult(folder.path, read_summary(folder.path) if done else {},
                     read_metrics(folder.path), results, None if done else cfg.stop_after)


def _prepare(cfg: RunConfig) -> RunFolder:
    algorithm = cfg.make_algorithm()
    for warning in algorithm.validate(cfg.workers, cfg.learning_rate):
        print(f"warning: {warning}", file=sys.stderr)
    folder = RunFolder(cfg.out or default_run_dir(cfg.algorithm))
    folder.write_config({**cfg.to_json(), "out": str(folder.path)})
    folder.start_metrics()
    return folder


def _checkpoints(cfg: RunConfig, folder: RunFolder | None, total: int, evaluator: Evaluator | None,
                 world: SimWorld | None, saved: dict[str, Any] | None) -> Checkpoints | None:
    """The checkpoint taker of a run, with the evaluator restored when it resumes."""
    if not cfg.checkpoint_every and saved is None:
        return None
    if saved is not None and evaluator is not None:
        evaluator.load_state_dict(saved["evaluator"], read_metrics(folder.path)
                                  if folder is not None else [])
    config = {**cfg.to_json(), "out": str(folder.path) if folder is not None else None}
    return Checkpoints(config, folder.path if folder is not None else None,
                       checkpoint_steps(cfg, total), cfg.stop_after, evaluator, world, saved)


def _simulate(cfg: RunConfig, dataset: data.Dataset, folder: RunFolder,
              saved: dict[str, Any] | None = None) -> list[WorkerResult]:
    # --link A:B:LATENCY:BANDWIDTH overrides both directions of one link (global ranks).
    links = {}
    for a, b, latency, bandwidth in cfg.links:
        links[(a, b)] = links[(b, a)] = Link(latency, bandwidth)
    world = SimWorld(cfg.world_size(), NetworkModel(cfg.latency, cfg.bandwidth, links))
    total = cfg.total_steps(dataset)
    evaluator = Evaluator(cfg, dataset, folder, total)
    evals = eval_steps(cfg, total)
    observer: SimObserver | BudgetObserver
    if cfg.make_algorithm().synchronous:
        observer = SimObserver(evaluator, cfg.workers, evals)
    else:
        observer = BudgetObserver(evaluator, cfg.workers, evals)
    checkpoints = _checkpoints(cfg, folder, total, evaluator, world, saved)
    if checkpoints is not None:
        observer.attach(checkpoints)
    bar = _progress(cfg, total, evaluator)

    def body(comm: Comm) -> WorkerResult:
        on_step = bar.update_to if bar is not None and comm.rank == world.world_size - 1 else None
        return worker_loop(comm, cfg, dataset, observer, on_step, saved)

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


def _process_entry(comm: Comm, cfg: RunConfig, out: str | None,
                   resume_from: str | None = None) -> WorkerResult:
    """One real worker process (launched locally or by torchrun); `resume_from`: the checkpoint
    file every rank reads its own part from."""
    dataset = data.load(cfg.dataset, cfg.data_dir)
    total = cfg.total_steps(dataset)
    first_worker = comm.world_size - cfg.workers  # servers, if any, take the first ranks
    saved = (None if resume_from is None
             else torch.load(resume_from, map_location="cpu", weights_only=True))
    evaluator = None
    folder = None
    bar = None
    if comm.rank == first_worker:
        folder = RunFolder(out) if out is not None else None
        evaluator = Evaluator(cfg, dataset, folder, total, started=time.perf_counter())
        bar = _progress(cfg, total, evaluator)
    observer = CollectiveObserver(evaluator, total, eval_steps(cfg, total),
                                  reports=cfg.on_failure == "continue")
    checkpoints = _checkpoints(cfg, folder, total, evaluator, None, saved)
    if checkpoints is not None:
        observer.attach(checkpoints)
    try:
        return worker_loop(comm, cfg, dataset, observer,
                           bar.update_to if bar is not None else None, saved)
    finally:
        if bar is not None:
            bar.close()


def _torchrun(cfg: RunConfig) -> RunResult:
    from distsgd import launch

    comm = launch.from_torchrun_env(timeout=cfg.timeout, device=cfg.device)
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
