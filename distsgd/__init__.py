"""distsgd: the distributed SGD algorithms of the literature, in a simulator and on real processes.

The public surface is `__all__`; everything else is private.
"""

from pathlib import Path

from distsgd.algorithms import REGISTRY, Algorithm, WorkerContext, create, hyperparameter, register
from distsgd.algorithms.allreduce import AllReduce
from distsgd.algorithms.crossover import Crossover
from distsgd.algorithms.easgd import EASGD
from distsgd.algorithms.local_sgd import LocalSGD
from distsgd.algorithms.sgp import SGP
from distsgd.comm.base import Comm, Group
from distsgd.config import RunConfig
from distsgd.errors import CheckpointError, CommTimeout, DeadlockError, UsageError, WorkerFailure
from distsgd.optimizer import DistributedOptimizer, is_server, sampler, serve
from distsgd.roles import Roles
from distsgd.runtime import RunResult, simulate_ranks

# The training-loop module `distsgd.train` is imported above (through `distsgd.runtime`), before
# the function `train` below is defined, so the function (the public API) is what `distsgd.train`
# names; the module stays importable as `from distsgd.train import ...`.

__version__ = "0.1.0"


def train(**options: object) -> RunResult:
    """Run one training job (simulated or on local processes); see `distsgd.config.RunConfig`.

    >>> result = distsgd.train(algorithm="sgp", workers=8, backend="sim", steps=300)
    >>> result.summary["test_accuracy"]
    """
    from distsgd.runtime import run
    from distsgd.torchrun_job import with_default_workers

    return run(RunConfig.create(**with_default_workers(options)))


def resume(run_dir: str | Path, *, progress: bool = False,
           stop_after: int | None = None) -> RunResult:
    """Continue a run from the checkpoint in its folder (`distsgd.train(..., checkpoint_every=N)`),
    appending to its metrics; see docs/checkpoints.md.

    >>> distsgd.train(algorithm="sgp", steps=300, checkpoint_every=50, stop_after=100, out="r")
    >>> distsgd.resume("r").summary["test_accuracy"]
    """
    from distsgd.runtime import resume as _resume

    return _resume(run_dir, progress=progress, stop_after=stop_after)


__all__ = [
    "EASGD",
    "REGISTRY",
    "SGP",
    "Algorithm",
    "AllReduce",
    "CheckpointError",
    "Comm",
    "CommTimeout",
    "Crossover",
    "DeadlockError",
    "DistributedOptimizer",
    "Group",
    "LocalSGD",
    "Roles",
    "RunConfig",
    "RunResult",
    "UsageError",
    "WorkerContext",
    "WorkerFailure",
    "create",
    "hyperparameter",
    "is_server",
    "register",
    "resume",
    "sampler",
    "serve",
    "simulate_ranks",
    "train",
]
