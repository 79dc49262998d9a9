"""Each worker's batches: a disjoint shard of the train set (or all of it), in a seeded order.

The stream is a pure function of (data set, worker, workers, batch size, seed, sampling), the
same in any process and under any schedule, and can start at any batch (a resumed run).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from distsgd.data.dataset import Dataset
from distsgd.errors import UsageError

SAMPLINGS = ("shard", "iid")


def shard_indices(n: int, worker: int, workers: int, seed: int) -> torch.Tensor:
    """Worker `worker`'s fixed share of `range(n)`: disjoint, covering, sizes within one.

    Every worker draws the same seeded permutation and takes every `workers`-th element of it.
    """
    order = np.random.default_rng(seed).permutation(n)
    return torch.from_numpy(order[worker::workers].copy())


def batches(dataset: Dataset, worker: int, workers: int, batch_size: int, seed: int,
            sampling: str = "shard", start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of (x, y) training batches for one worker, the same in any process.

    `sampling="shard"` gives each worker a disjoint shard of the train set (`shard_indices`);
    `"iid"` lets every worker sample the whole train set. Each pass visits the worker's samples in
    a new order drawn from (seed, worker, pass). Batches run on across the end of a pass, so every
    batch has exactly `batch_size` samples and none is dropped. `start` skips that many batches
    (a resumed run's data position) without drawing them.
    """
    _check_batches_args(worker, workers, batch_size, seed, sampling)
    n = len(dataset.y_train)
    pool = (shard_indices(n, worker, workers, seed) if sampling == "shard"
            else torch.arange(n))
    if batch_size > len(pool):
        what = f"worker {worker}'s shard" if sampling == "shard" else "the train set"
        raise UsageError(f"batch_size={batch_size} is larger than {what} ({len(pool)} samples); "
                         f"use batch_size <= {len(pool)} or fewer workers")
    if start < 0:
        raise UsageError(f"start={start} is out of range: it must be at least 0")
    return _stream(dataset, pool, batch_size, seed, worker, start)


def _check_batches_args(worker: int, workers: int, batch_size: int, seed: int,
                        sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise UsageError(f"unknown sampling {sampling!r}: choose one of {', '.join(SAMPLINGS)}")
    if workers < 1:
        raise UsageError(f"workers={workers} is out of range: it must be at least 1")
    if not 0 <= worker < workers:
        raise UsageError(f"worker={worker} is out of range: valid values are 0..{workers - 1}")
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size} is out of range: it must be at least 1")
    if seed < 0:
        raise UsageError(f"seed={seed} is out of range: it must be at least 0")


def _stream(dataset: Dataset, pool: torch.Tensor, batch_size: int, seed: int,
            worker: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Sample s of the stream is sample s mod P of pass s // P (P samples a pass), so batch
    # `start` begins inside pass start·B // P: begin there with that pass's remaining samples.
    epoch, offset = divmod(start * batch_size, len(pool))
    pending = torch.empty(0, dtype=torch.int64)
    if offset:
        order = np.random.default_rng([seed, worker, epoch]).permutation(len(pool))
        pending = pool[torch.from_numpy(order[offset:])]
        epoch += 1
    while True:
        while len(pending) < batch_size:
            # one explicitly seeded generator per pass: nothing touches the global RNG
            order = np.random.default_rng([seed, worker, epoch]).permutation(len(pool))
            pending = torch.cat([pending, pool[torch.from_numpy(order)]])
            epoch += 1
        idx, pending = pending[:batch_size], pending[batch_size:]
        yield dataset.x_train[idx], dataset.y_train[idx]
