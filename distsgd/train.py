"""THE training loop: one worker's life, the same on every backend.

Read it top to bottom in `worker_loop`: build the model and the shard, wrap the optimizer in
`DistributedOptimizer`, then step, charging the compute time to the communicator (virtual time in
the simulator, nothing on real hardware) and publishing the state every ``eval_every`` steps to an
observer that evaluates the consensus model without disturbing the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from distsgd import data, models
from distsgd.comm.base import Comm
from distsgd.comm.sim.compute import ComputeModel, Slowdown
from distsgd.config import RunConfig, worker_device
from distsgd.errors import DivergenceError
from distsgd.observer import Contribution, Observer
from distsgd.optimizer import DistributedOptimizer, serve, split_roles


@dataclass
class WorkerResult:
    rank: int
    steps: int
    state: torch.Tensor  # the final flat model of this worker
    bytes_by_verb: dict[str, int]
    virtual_time_s: float | None
    figures: dict[str, Any] = field(default_factory=dict)  # a server's final figures


def worker_loop(comm: Comm, cfg: RunConfig, dataset: data.Dataset, observer: Observer,
                on_step: Callable[[int], None] | None = None,
                resume: dict[str, Any] | None = None) -> WorkerResult:
    """One rank's run: a training worker, or a server of a parameter-server algorithm.

    `resume`: a checkpoint (`distsgd.checkpoint`) to continue from instead of the start.
    """
    algorithm = cfg.make_algorithm()
    servers, workers = split_roles(algorithm, comm.world_size)
    torch.manual_seed(cfg.seed)  # every rank builds the same initial model
    device = worker_device(cfg.device)
    # Built on the CPU (the same initial model on every device), then moved to its device.
    model = models.build(cfg.model_name, dataset.input_shape, dataset.num_classes).to(device)
    # This worker's own torch generator (dropout), swapped in around its forward and backward:
    # simulated workers share one process, and their draws must not depend on the schedule.
    rng = torch.get_rng_state()
    if comm.rank in servers:
        saved_shard = resume["servers"][comm.rank] if resume is not None else None
        figures = serve(model, algorithm, lr=cfg.learning_rate, comm=comm, seed=cfg.seed,
                        saved=saved_shard)
        return WorkerResult(comm.rank, 0, torch.empty(0), comm.bytes_by_verb, comm.now(), figures)
    index = workers.index(comm.rank)
    momentum = cfg.momentum if algorithm.local_momentum() else 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=momentum,
                                weight_decay=cfg.weight_decay)
    opt = DistributedOptimizer(model, optimizer, algorithm, comm=comm, seed=cfg.seed)
    compute = ComputeModel.parse(cfg.compute_time)
    straggle = dict(cfg.stragglers).get(index, 1.0)
    jitter = Slowdown.parse(cfg.slowdown).factors(cfg.seed, index)
    flops = models.forward_flops(model, dataset.input_shape)
    loss_sum, loss_count = 0.0, 0
    if resume is not None:
        saved = resume["workers"][index]
        opt.load_state_dict(saved)  # model, optimizer (momentum), step, algorithm state
        jitter.rng.bit_generator.state = saved["jitter"]
        rng, loss_sum, loss_count = saved["torch_rng"], saved["loss_sum"], saved["loss_count"]
        if comm.now() is None:  # real processes: counting goes on from the checkpoint's bytes
            comm.restore_counts(saved["bytes_by_verb"])  # (the simulator restores its own)
    # The data position is the number of batches taken: one a step.
    batches = data.batches(dataset, index, len(workers), cfg.batch_size, cfg.seed, cfg.sampling,
                           start=opt.ctx.step)

    def snapshot() -> Contribution:
        params = opt.ctx.flat.get()
        if not torch.isfinite(params).all():  # never write a NaN model into the results
            raise DivergenceError(f"worker {index} diverged: its model holds non-finite values "
                                  f"after step {opt.ctx.step}")
        vector, weight = algorithm.evaluated(opt.ctx, opt.state)
        extra = algorithm.metrics(opt.ctx, opt.state) if index == 0 else {}
        # Evaluation runs on the CPU (and its collectives on gloo) whatever the device.
        return Contribution(params.cpu(), vector.cpu(), weight, loss_sum, loss_count,
                            comm.bytes_sent, comm.now(), extra)

    def capture() -> dict[str, Any]:
        """Everything this worker needs to go on from here (at a checkpoint step)."""
        return {**opt.state_dict(), "jitter": jitter.rng.bit_generator.state,
                "torch_rng": rng.clone(), "loss_sum": loss_sum, "loss_count": loss_count,
                "bytes_by_verb": comm.bytes_by_verb, "clock": comm.now(),
                # Worker 0 also fetches the servers' shards (every worker is at the checkpoint).
                "servers": algorithm.server_state_dicts(opt.ctx, opt.state) if index == 0 else []}

    observer.begin(opt.ctx, snapshot, capture)
    model.train()
    step = opt.ctx.step
    while observer.take(opt.ctx, step):
        step += 1
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        started = time.perf_counter()
        shared = torch.get_rng_state()
        torch.set_rng_state(rng)
        loss = F.cross_entropy(model(x), y)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        rng = torch.get_rng_state()
        torch.set_rng_state(shared)
        if not finite and cfg.on_divergence == "stop":
            raise DivergenceError(f"worker {index} diverged: loss {loss.item()} at step {step} "
                                  "(lower --lr, or --on-divergence skip)")
        # With --on-divergence skip, the update is skipped: the gradient stays zero, but the step
        # still runs, so the algorithm's messages and collectives happen and nobody waits.
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # measured: the kernels' time, not their launch's
        measured = time.perf_counter() - started
        slow = straggle * next(jitter)
        comm.elapse(slow * compute.step_seconds(flops, len(y), measured))
        if comm.now() is None and slow > 1.0:
            time.sleep((slow - 1.0) * measured)  # real processes: stragglers really wait
        opt.step()
        opt.zero_grad()
        if finite:
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        if on_step is not None:
            on_step(step)
        observer.stepped(opt.ctx, step, snapshot)
    opt.finish()
    return WorkerResult(comm.rank, step, opt.ctx.flat.get().cpu(), comm.bytes_by_verb,
                        comm.now())
