"""Start a run: simulated workers, N local processes, or one process of a torchrun job.

`run(cfg)` is what `distsgd train` and `distsgd.train(...)` call. Whatever the backend, each worker
runs `train.worker_loop`; only the communicator and the observer differ.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from distsgd import checkpoint, data, models, torchrun_job
from distsgd.algorithms.base import Algorithm
from distsgd.algorithms.ps import merge_figures
from distsgd.checkpoint import Checkpoints
from distsgd.comm.base import Comm
from distsgd.comm.sim import Link, NetworkModel, SimWorld
from distsgd.comm.sim.compute import transfer_cpu
from distsgd.config import RunConfig, checkpoint_steps, eval_steps
from distsgd.errors import CheckpointError, UsageError
from distsgd.evaluation import BudgetObserver, CollectiveObserver, Evaluator, SimObserver
from distsgd.metrics import RunFolder, default_run_dir, read_metrics, read_summary
from distsgd.roles import Roles
from distsgd.spawn_guard import check_main_guard
from distsgd.train import WorkerResult, worker_loop

T = TypeVar("T")


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    workers: list[WorkerResult] = field(default_factory=list)  # empty under torchrun
    stopped_at: int | None = None  # the checkpoint step a --stop-after run stopped at
    reporting: bool = True  # False on the ranks of a torchrun job that print nothing
    resume_with: str | None = None  # a stopped run's: the command that continues it


def run(cfg: RunConfig) -> RunResult:
    launched = time.time()  # start-up (the summary's startup_s) counts from here
    cfg.check()
    if cfg.backend == "torchrun":
        return _torchrun(cfg, launched, lambda: _prepare(cfg))
    if cfg.backend == "processes":
        check_main_guard('distsgd.train(backend="processes")')
    dataset = data.load(cfg.dataset, cfg.data_dir)  # fails early, before any worker starts
    cfg.check_length(cfg.total_steps(dataset))
    folder = _prepare(cfg)
    try:
        return _start(cfg, dataset, folder, None, launched)
    finally:
        folder.release()


def resume(run_dir: str | Path, *, progress: bool = False,
           stop_after: int | None = None) -> RunResult:
    """Continue the run in `run_dir` from its checkpoint, in the same folder: its config comes
    from the checkpoint (checked against config.json), and metrics.jsonl keeps the lines up to
    the checkpoint's step and goes on from there. `stop_after`: stop again at a later checkpoint.

    A folder that is not a run, has no checkpoint, or a damaged or foreign one raises
    `CheckpointError` and is left untouched.
    """
    launched = time.time()
    _, saved = checkpoint.load(run_dir)
    options = {**saved["config"], "out": str(run_dir), "progress": progress,
               "stop_after": stop_after}
    path = Path(run_dir, checkpoint.FILE)
    try:
        cfg = RunConfig.create(**options)
    except UsageError as e:  # the file's fault, not the command line's: exit 1
        raise CheckpointError(f"{path} holds a run config that is not valid: {e}") from None
    if cfg.backend == "torchrun" and not torchrun_job.is_torchrun():
        raise UsageError(f"resume: the run in {run_dir} was started under torchrun; resume it "
                         f"with {torchrun_job.resume_command(run_dir, cfg)}")
    if stop_after is not None and stop_after <= saved["step"]:
        raise UsageError(f"stop_after={stop_after} is not a checkpoint step after the "
                         f"checkpoint's step {saved['step']}: valid values are multiples of "
                         f"checkpoint_every={cfg.checkpoint_every} above it")
    if cfg.backend == "processes":
        check_main_guard("distsgd.resume")
    dataset = data.load(cfg.dataset, cfg.data_dir)
    total = cfg.total_steps(dataset)
    cfg.check_length(total)
    model = models.build(cfg.model_name, dataset.input_shape, dataset.num_classes)
    checkpoint.check_for_run(saved, cfg, total, model, path)
    if cfg.backend == "torchrun":  # every rank has read and checked the checkpoint by now
        return _torchrun(cfg, launched, lambda: _reopen(run_dir, saved), str(path))
    folder = _reopen(run_dir, saved)
    try:
        return _start(cfg, dataset, folder, saved, launched)
    finally:
        folder.release()


def _reopen(run_dir: str | Path, saved: dict[str, Any]) -> RunFolder:
    """The folder of a run being resumed, locked, its files back at the checkpoint's step."""
    folder = RunFolder.open(run_dir)  # a run still going on it: refused, nothing changed
    try:
        checkpoint.keep_metrics_through(run_dir, saved["metrics_step"])  # the first change made
        # A summary from before (the run had finished, then was resumed from its last
        # checkpoint) would describe a run that is being redone: it is written again at the end.
        Path(run_dir, "summary.json").unlink(missing_ok=True)
    except BaseException:
        folder.release()
        raise
    return folder


def _start(cfg: RunConfig, dataset: data.Dataset, folder: RunFolder,
           saved: dict[str, Any] | None, launched: float | None = None) -> RunResult:
    if cfg.backend == "sim":
        results = _simulate(cfg, dataset, folder, saved, launched)
    else:
        from distsgd import launch

        # The servers and the evaluating worker are essential: their death ends any run.
        first_worker = cfg.roles().workers[0]
        path = str(folder.path / checkpoint.FILE) if saved is not None else None
        results = launch.launch(_process_entry, cfg.world_size(),
                                args=(cfg, str(folder.path), path, launched),
                                comm_timeout=cfg.timeout, on_failure=cfg.on_failure,
                                essential=range(first_worker + 1), device=cfg.device)
        results = [r for r in results if r is not None]  # None: a worker that died
        _servers_final_figures(folder, results)
    # summary.json was written once, by the last evaluation; in the simulator every worker's last
    # update has been applied by then, so its staleness figures equal the servers' own (tests
    # check it). On processes another worker's last push may still be on its way to a server
    # when the evaluating worker takes the last snapshot: the servers' own final figures win.
    return _result(cfg, folder, results)


SERVER_FIGURES = ("staleness_mean", "staleness_max", "staleness_histogram", "ssp_max_clock_gap",
                  "server_bytes_sent")


def _servers_final_figures(folder: RunFolder, results: list[WorkerResult]) -> None:
    """Put the servers' final figures (every push they applied, once every worker has said
    goodbye) into summary.json, in place of the last snapshot's."""
    figures = [r.figures for r in results if r.figures]
    if not figures or not (folder.path / "summary.json").is_file():
        return
    final = merge_figures(figures)
    summary = read_summary(folder.path)
    summary.update({k: final[k] for k in SERVER_FIGURES if k in final and k in summary})
    folder.write_summary(summary)


def _result(cfg: RunConfig, folder: RunFolder, results: list[WorkerResult]) -> RunResult:
    """What the run left in its folder; one stopped at a checkpoint (--stop-after) has no
    summary yet, and the command that continues it instead."""
    if (folder.path / "summary.json").is_file():
        return RunResult(folder.path, read_summary(folder.path), read_metrics(folder.path),
                         results)
    return RunResult(folder.path, {}, read_metrics(folder.path), results, cfg.stop_after,
                     resume_with=torchrun_job.resume_command(folder.path, cfg))


def _prepare(cfg: RunConfig) -> RunFolder:
    algorithm = cfg.make_algorithm()
    for warning in algorithm.validate(cfg.workers, cfg.learning_rate):
        print(f"warning: {warning}", file=sys.stderr)
    # Locked for the run's life (the caller releases it): a second run on it is refused.
    folder = RunFolder.create(cfg.out or default_run_dir(cfg.algorithm), overwrite=cfg.overwrite)
    try:
        folder.write_config({**cfg.to_json(), "out": str(folder.path)})
        folder.start_metrics()
    except BaseException:
        folder.release()
        raise
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
              saved: dict[str, Any] | None = None,
              launched: float | None = None) -> list[WorkerResult]:
    # --link A:B:LATENCY:BANDWIDTH overrides both directions of one link (global ranks).
    links = {}
    for a, b, latency, bandwidth in cfg.links:
        links[(a, b)] = links[(b, a)] = Link(latency, bandwidth)
    world = SimWorld(cfg.world_size(), NetworkModel(
        cfg.latency, cfg.bandwidth, links,
        cpu_per_byte=transfer_cpu(cfg.world_size(), cfg.cores)))  # 0 unless --cores
    total = cfg.total_steps(dataset)
    evaluator = Evaluator(cfg, dataset, folder, total, launched)
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

    def body(comm: Comm, _: Roles) -> WorkerResult:
        on_step = bar.update_to if bar is not None and comm.rank == world.world_size - 1 else None
        return worker_loop(comm, cfg, dataset, observer, on_step, saved)

    try:
        return simulate_ranks(cfg.make_algorithm(), cfg.workers, body, world=world)
    finally:
        if bar is not None:
            bar.close()


def simulate_ranks(algorithm: Algorithm | str, workers: int, body: Callable[[Comm, Roles], T], *,
                   network: NetworkModel | None = None, world: SimWorld | None = None) -> list[T]:
    """Run `body(comm, roles)` on every rank of a simulated run of `workers` training workers
    plus the algorithm's parameter servers (the first ranks: `roles.is_server(comm.rank)`);
    return each rank's result, by rank.

    `network`: the simulated network (default `NetworkModel()`); or `world`: a `SimWorld` made
    beforehand (to look into it while the ranks run), of `roles.world_size` ranks.

        def body(comm, roles):
            if roles.is_server(comm.rank):
                return distsgd.serve(model(), algorithm, lr=0.05, comm=comm)
            opt = distsgd.DistributedOptimizer(model(), ..., algorithm, comm=comm)
            ...
        results = distsgd.simulate_ranks(algorithm, 8, body)
    """
    roles = Roles.of(algorithm, workers)
    if world is None:
        world = SimWorld(roles.world_size, network)
    elif network is not None:
        raise UsageError("simulate_ranks: give either network or world, not both")
    elif world.world_size != roles.world_size:
        raise UsageError(f"simulate_ranks: the world has {world.world_size} ranks but {workers} "
                         f"workers need {roles.world_size}; valid: SimWorld({roles.world_size})")
    # Simulated ranks share this process: one intra-op thread keeps runs bit-for-bit
    # reproducible and avoids oversubscribing the cores while one rank runs at a time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return world.run(lambda comm: body(comm, roles))
    finally:
        torch.set_num_threads(threads)


def _process_entry(comm: Comm, cfg: RunConfig, out: str | None,
                   resume_from: str | None = None,
                   launched: float | None = None) -> WorkerResult:
    """One real worker process (launched locally or by torchrun); `resume_from`: the checkpoint
    file every rank reads its own part from."""
    dataset = data.load(cfg.dataset, cfg.data_dir)
    total = cfg.total_steps(dataset)
    first_worker = cfg.roles().workers[0]  # the evaluating worker
    saved = (None if resume_from is None
             else torch.load(resume_from, map_location="cpu", weights_only=True))
    evaluator = None
    folder = None
    bar = None
    if comm.rank == first_worker:
        folder = RunFolder(out) if out is not None else None
        evaluator = Evaluator(cfg, dataset, folder, total, launched)
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


def _torchrun(cfg: RunConfig, launched: float, claim: Callable[[], RunFolder],
              resume_from: str | None = None) -> RunResult:
    """This process's part of a torchrun job; `claim()` takes the run folder on the first worker
    (`_prepare`, or `_reopen` to resume from the checkpoint file `resume_from`)."""
    torchrun_job.check_world(cfg, resuming=resume_from is not None)
    folder, result = torchrun_job.join(cfg, claim, lambda comm, folder: _process_entry(
        comm, cfg, str(folder.path) if folder else None, resume_from, launched))
    if folder is None:  # not the reporting rank: its result only, nothing to print
        return RunResult(Path(), {}, [], [result], reporting=False)
    return _result(cfg, folder, [result])


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
