"""adpsgd with --on-failure continue: an active whose passive died with its request learns it
(`PeerDied` from ``poll``, as from ``recv``) and goes on with the other passives, on real
processes and in the simulator, instead of waiting for a reply that never comes.

The scenario is deterministic about the one thing that matters: passive 3 dies right after it
has taken a request, without answering, so the active that sent it is waiting on a dead peer.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import make_model

import distsgd
from distsgd.algorithms.adpsgd import ADPSGD, REPLY, REQUEST
from distsgd.comm.base import Comm
from distsgd.comm.sim import SimWorld
from distsgd.errors import PeerDied
from distsgd.launch import launch

N, VICTIM, SURVIVOR = 4, 3, 1  # actives 0 and 2; passives 1 and 3 (worker index = rank)
REPLIES = 8  # each active must collect this many replies from the surviving passive
REAL_SECONDS, VIRTUAL_STEPS = 60.0, 5000  # an active gives up after this (the bug's symptom)


class Counting:
    """Counts the replies a worker takes from the surviving passive."""

    def __init__(self, inner: Comm) -> None:
        self.inner, self.replies = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def poll(self, out: torch.Tensor, src: int | None = None) -> int | None:
        got = self.inner.poll(out, src)
        if got == SURVIVOR and float(out[-1]) == REPLY:
            self.replies += 1
        return got


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: no goodbye, nothing sent after


def after_a_passive_dies(comm: Comm, die: Callable[[], None] = _die) -> tuple[int, int] | None:
    """Passive 3 takes one request and dies; passive 1 answers until the actives say goodbye;
    each active steps until it has `REPLIES` replies from passive 1 (or gives up). An active
    returns (replies, whether it learnt of the death)."""
    model = make_model()
    counting = Counting(comm)
    # Every rank makes one: its workers' group is a collective on processes.
    opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                       ADPSGD(), comm=counting,
                                       seed=3, sync_init=False)
    if comm.rank == VICTIM:
        inbox = torch.empty(opt.ctx.flat.numel + 1)
        goodbyes = 0
        while goodbyes < 2:  # both actives said goodbye without asking it: it never dies
            if comm.poll(inbox) is None:
                _pause(comm)
            elif float(inbox[-1]) == REQUEST:
                die()
                return None
            else:
                goodbyes += 1
        return (-1, -1)  # check() fails: the scenario did not happen
    if comm.rank == SURVIVOR:
        opt.finish()  # a passive's finish answers until every active has said goodbye (or died)
        return None
    start, steps = time.monotonic(), 0
    while counting.replies < REPLIES:
        opt.step()  # no gradient, lr 0: only the pairwise averages move the model
        steps += 1
        if (steps > VIRTUAL_STEPS if comm.now() is not None
                else time.monotonic() - start > REAL_SECONDS):
            break
        _pause(comm)
    learnt = VICTIM in opt.algorithm_state.dead
    opt.finish()
    return counting.replies, int(learnt)


def _pause(comm: Comm) -> None:
    comm.elapse(0.01)
    if comm.now() is None:
        time.sleep(0.002)


def check(results: list[tuple[int, int] | None]) -> None:
    assert results[VICTIM] is None and results[SURVIVOR] is None
    actives = [r for r in results if r is not None]
    assert len(actives) == 2, results
    # Every active went on with passive 1 (the stalled one would stop at its request to 3) ...
    assert all(replies >= REPLIES for replies, _ in actives), results
    # ... and at least one had to learn of the death: the one whose request 3 took.
    assert any(learnt for _, learnt in actives), results


class Mortal:
    """The simulator has no deaths (no rank of it can die): this models TorchComm's semantics
    under --on-failure continue once a rank has died and the launcher said so: a send to it
    raises `PeerDied`, and so does a poll or recv from it once nothing it sent is left."""

    def __init__(self, inner: Comm, dead: set[int]) -> None:
        self.inner, self.dead = inner, dead

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def die(self) -> None:
        self.dead.add(self.inner.rank)

    def _raise_if_dead(self, peer: int | None) -> None:
        if peer in self.dead:
            raise PeerDied(f"rank {peer} is dead", peer)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._raise_if_dead(dst)
        self.inner.send(tensor, dst)

    def poll(self, out: torch.Tensor, src: int | None = None) -> int | None:
        got = self.inner.poll(out, src)
        if got is None:
            self._raise_if_dead(src)
        return got

    def recv(self, out: torch.Tensor, src: int | None = None, timeout: float | None = None) -> int:
        if src in self.dead:
            got = self.inner.poll(out, src)
            if got is None:
                self._raise_if_dead(src)
            assert got is not None
            return got
        return self.inner.recv(out, src)


@pytest.mark.timeout(120)
def test_in_the_simulator_an_active_goes_on_after_its_passive_died() -> None:
    dead: set[int] = set()

    def body(comm: Comm) -> tuple[int, int] | None:
        mortal = Mortal(comm, dead)
        return after_a_passive_dies(mortal, mortal.die)

    check(SimWorld(N).run(body))


@pytest.mark.processes
@pytest.mark.timeout(300)
def test_on_processes_an_active_goes_on_after_its_passive_died() -> None:
    results = launch(after_a_passive_dies, N, timeout=240, comm_timeout=60,
                     on_failure="continue", essential=[0])
    check(results)


@pytest.mark.processes
@pytest.mark.timeout(400)
def test_a_continue_run_finishes_with_the_survivors_well_before_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Passive worker 3 (rank 3) is killed a third of the way in; the actives that asked it must
    # go on, and the run ends with the three survivors, not at the 60 s timeout.
    monkeypatch.setenv("DISTSGD_KILL", f"{VICTIM}:12")
    timeout = 60.0
    result = distsgd.train(algorithm="adpsgd", workers=N, backend="processes", dataset="digits",
                           model="mlp", steps=36, eval_every=12, on_failure="continue",
                           timeout=timeout, out=str(tmp_path))
    summary = result.summary
    (failed,) = summary["failed_workers"]
    assert {k: failed[k] for k in ("rank", "worker", "last_step")} == {
        "rank": VICTIM, "worker": VICTIM, "last_step": 12}, summary
    assert sorted(w.rank for w in result.workers) == [0, 1, 2], summary
    assert summary["steps"] == 36, summary
    # From the first step to the end: seconds of training, far from the timeout a stall runs to.
    assert summary["real_time_s"] < timeout / 3, summary
