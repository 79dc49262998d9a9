"""The three parts an `Algorithm` is made of, each a small base class with do-nothing defaults.

- `TrainingHooks`: what runs on every worker, once per step, and the per-worker state it keeps
  (checkpointed by the generic state walk, `checkpoint.capture` / `restore`);
- `MeasuredModel`: which model the run evaluates, and the figures the metrics line adds;
- `ServerRole`: server ranks, for the parameter-server algorithms; none by default.

The hooks run on every worker, in this order, once per step::

    loss.backward()
    algorithm.after_backward(ctx, state)   # e.g. average gradients
    optimizer.step()
    algorithm.after_step(ctx, state)       # e.g. mix parameters with peers
    ctx.step += 1
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from distsgd.algorithms.context import WorkerContext
from distsgd.checkpoint import walk as checkpoint


class TrainingHooks:
    """The training loop's hooks. `state` is whatever `init` returned: per-worker and mutable,
    while the algorithm itself is a frozen config shared by every simulated worker."""

    def init(self, ctx: WorkerContext) -> Any:
        """Per-worker state; called once on every worker after the models are made identical."""
        return None

    def after_backward(self, ctx: WorkerContext, state: Any) -> None:
        """Gradients are in ``p.grad``; the local optimizer step comes next."""

    def after_step(self, ctx: WorkerContext, state: Any) -> None:
        """The local optimizer step has been applied."""

    def finish(self, ctx: WorkerContext, state: Any) -> None:
        """The worker has taken its last step (a parameter-server client says goodbye here)."""

    def state_dict(self, ctx: WorkerContext, state: Any) -> Any:
        """This worker's algorithm state as plain data (docs/checkpoints.md). The default walks
        the state object: dataclasses, tensors, numbers, containers, numpy generators."""
        return checkpoint.capture(state)

    def load_state_dict(self, ctx: WorkerContext, state: Any, saved: Any) -> Any:
        """Put `saved` (from `state_dict`) back into `state`, made by `init`; returns the state."""
        return checkpoint.restore(state, saved)


class MeasuredModel:
    """What the run measures: the evaluated model, and extra figures for the metrics line."""

    def evaluated(self, ctx: WorkerContext, state: Any) -> tuple[torch.Tensor, float]:
        """This worker's share of the evaluated model: (flat vector, weight).

        The evaluated model is the weighted average of every worker's vector; the default is the
        plain average of the workers' models. Elastic averaging returns the center variable.
        """
        return ctx.flat.get(), 1.0

    def metrics(self, ctx: WorkerContext, state: Any) -> dict[str, Any]:
        """Extra figures for the metrics line, asked of worker 0 after `evaluated`."""
        return {}


class ServerRole:
    """Server ranks next to the workers. They take the first global ranks (`distsgd.Roles`) and
    run `serve` instead of the training loop; an algorithm without servers keeps these defaults."""

    name: ClassVar[str] = ""

    def servers(self, workers: int) -> int:
        """How many server ranks this algorithm needs next to `workers` workers."""
        return 0

    def serve(self, ctx: WorkerContext, saved: Any = None) -> dict[str, Any]:
        """The server role's loop, for algorithms whose `servers` is positive; runs until every
        worker has finished and returns the server's final figures. `saved`: this server's state
        from a checkpoint, to start from instead of the model."""
        raise NotImplementedError(f"{self.name} has no server role")

    def server_state_dicts(self, ctx: WorkerContext, state: Any) -> list[Any]:
        """Every server's state, fetched by worker 0 at a checkpoint (none: no server role)."""
        return []
