"""adpsgd: the pair average conserves the mean and reaches consensus, the bipartite protocol ends
cleanly whoever finishes first, runs replay, and a dead peer is skipped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from tiny import batch, make_model
from torch import nn

import distsgd
from distsgd import mixing
from distsgd.algorithms.adpsgd import ADPSGD, DONE, REQUEST
from distsgd.comm.base import Comm
from distsgd.comm.sim import SimWorld
from distsgd.errors import PeerDied

pytestmark = pytest.mark.timeout(120)


def run(n: int, steps: int | Callable[[int], int], *, lr: float = 0.1, perturb: float = 0.0,
        dtype: torch.dtype = torch.float32, seed: int = 7,
        step_time: Callable[[int], float] = lambda rank: 0.01,
        wrap: Callable[[Comm], Any] = lambda comm: comm,
        skip: frozenset[int] = frozenset()) -> list[torch.Tensor | None]:
    """Each worker's final flat model; `steps` may differ per rank; ranks in `skip` do nothing
    (a worker that died before the run began)."""

    def body(comm: Comm) -> torch.Tensor | None:
        if comm.rank in skip:
            return None
        model = make_model().to(dtype)
        opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=lr),
                                           ADPSGD(), comm=wrap(comm), seed=seed,
                                           sync_init=False)
        if perturb:
            g = torch.Generator().manual_seed(comm.rank)
            opt.ctx.flat.set_(opt.ctx.flat.get() + perturb * torch.randn(
                opt.ctx.flat.numel, generator=g, dtype=dtype))
        for step in range(steps(comm.rank) if callable(steps) else steps):
            x, y = batch(comm.rank, step)
            nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
            comm.elapse(step_time(comm.rank))
            opt.step()
            opt.zero_grad()
        opt.finish()
        return opt.ctx.flat.get()

    return SimWorld(n).run(body)


def start(n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [x for x in run(n, 0, perturb=1.0, dtype=dtype) if x is not None]


def test_without_gradients_the_mean_is_conserved_and_the_workers_converge_to_it() -> None:
    n = 6
    before = start(n, torch.float64)
    after = [x for x in run(n, 60, lr=0.0, perturb=1.0, dtype=torch.float64) if x is not None]
    # Every exchange moves a pair by ±d: float64 rounding only (one rounding per side).
    torch.testing.assert_close(sum(after) / n, sum(before) / n, atol=1e-13, rtol=0)
    assert mixing.consensus_distance(after) < 1e-3 * mixing.consensus_distance(before)
    mean = sum(before) / n
    assert max(float((x - mean).abs().max()) for x in after) < 1e-3


def test_whoever_stops_first_every_reply_lands_and_nothing_hangs() -> None:
    # Passives stop long before the actives (and then the other way round): a passive keeps
    # answering until every active has said goodbye, and an active collects its last reply.
    n = 5
    before = start(n, torch.float64)
    for steps in (lambda r: 40 if r % 2 == 0 else 3, lambda r: 3 if r % 2 == 0 else 40):
        after = [x for x in run(n, steps, lr=0.0, perturb=1.0, dtype=torch.float64)
                 if x is not None]
        torch.testing.assert_close(sum(after) / n, sum(before) / n, atol=1e-13, rtol=0)


class Recording:
    """Wraps a Comm and records (src, dst, kind) of every message sent."""

    log: ClassVar[list[tuple[int, int, float]]] = []

    def __init__(self, inner: Comm) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        Recording.log.append((self.inner.rank, dst, float(tensor[-1])))
        self.inner.send(tensor, dst)


def test_actives_ask_passives_and_only_passives_answer() -> None:
    Recording.log = []
    run(6, 20, wrap=Recording, step_time=lambda rank: 0.01 * (1 + rank))
    log = Recording.log
    requests = [(s, d) for s, d, k in log if k == REQUEST]
    assert requests and all(s % 2 == 0 and d % 2 == 1 for s, d in requests)
    assert {d for _, d in requests} == {1, 3, 5}  # every passive gets picked
    assert all(s % 2 == 1 and d % 2 == 0 for s, d, k in log if k not in (REQUEST, DONE))
    replies = [(s, d) for s, d, k in log if k not in (REQUEST, DONE)]
    assert sorted(replies) == sorted((d, s) for s, d in requests)  # one reply per request
    assert sorted((s, d) for s, d, k in log if k == DONE) == [
        (a, p) for a in (0, 2, 4) for p in (1, 3, 5)]


def test_a_run_replays_bit_for_bit_and_the_seed_matters() -> None:
    speeds = lambda rank: 0.01 * (4 if rank == 3 else 1)  # noqa: E731  a 4× straggler
    a = run(6, 15, step_time=speeds)
    b = run(6, 15, step_time=speeds)
    c = run(6, 15, step_time=speeds, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True) if x is not None)
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True) if x is not None)


class DeadPeer:
    """Raises PeerDied for any message to `dead`, as TorchComm does under --on-failure continue
    once the launcher has declared it dead."""

    dead = 3

    def __init__(self, inner: Comm) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        if dst == self.dead:
            raise PeerDied(f"rank {dst} is dead", dst)
        self.inner.send(tensor, dst)


def test_a_dead_passive_is_skipped_and_the_survivors_average() -> None:
    n, survivors = 6, [0, 1, 2, 4, 5]
    before = start(n, torch.float64)
    after = run(n, 40, lr=0.0, perturb=1.0, dtype=torch.float64, wrap=DeadPeer,
                skip=frozenset({DeadPeer.dead}))
    kept = [after[r] for r in survivors]
    assert after[DeadPeer.dead] is None
    total = sum(before[r] for r in survivors) / len(survivors)
    # No mass goes into the dead worker: the survivors' mean stays theirs.
    torch.testing.assert_close(sum(kept) / len(kept), total, atol=1e-13, rtol=0)
    assert mixing.consensus_distance(kept) < 1e-2 * mixing.consensus_distance(
        [before[r] for r in survivors])
