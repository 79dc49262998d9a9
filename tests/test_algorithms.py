"""Every registered algorithm: the conformance suite, then each one's exact reference test.

All of it runs in the simulator (the parity with real processes is in tests/test_processes.py).
Models are tiny and batches are a deterministic function of (worker, step), so each reference is
exact up to float summation order, with the tolerance stated where one is needed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny import batch, make_model
from torch import nn

import distsgd
from distsgd import algorithms
from distsgd.comm.base import Comm
from distsgd.comm.sim import SimWorld
from distsgd.errors import UsageError

pytestmark = pytest.mark.timeout(120)

def simulate(n: int, algorithm: distsgd.Algorithm, steps: int, lr: float = 0.1,
             perturb: float = 0.0, momentum: float = 0.0,
             watch: Callable[[distsgd.DistributedOptimizer], None] | None = None,
             step_time: float = 0.0, sent: dict[int, int] | None = None,
             ) -> list[distsgd.DistributedOptimizer]:
    """Train `n` simulated workers; `perturb` moves each worker off the common start first.

    `step_time`: virtual seconds of compute charged per step. Without it the virtual clock stands
    still while workers compute, so an asynchronous message never arrives before the run ends.
    `sent`: filled with the bytes each worker (by index) sent in its steps, set-up excluded.
    """

    def body(comm: Comm, roles: distsgd.Roles) -> distsgd.DistributedOptimizer | dict[str, Any]:
        model = make_model()
        if roles.is_server(comm.rank):
            return distsgd.serve(model, algorithm, lr=lr, comm=comm)
        opt = distsgd.DistributedOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), algorithm,
            comm=comm, seed=7)
        if perturb:
            g = torch.Generator().manual_seed(comm.rank)
            opt.ctx.flat.set_(opt.ctx.flat.get() + perturb * torch.randn(
                opt.ctx.flat.numel, generator=g))
            state = opt.algorithm_state
            if hasattr(state, "x"):  # push-sum keeps its own numerator: move it too
                state.x, state.z = opt.ctx.flat.get(), opt.ctx.flat.get()
        before = comm.bytes_sent  # the initial broadcast of worker 0's model is not the algorithm's
        for step in range(steps):
            x, y = batch(comm.rank, step)
            nn.functional.cross_entropy(model(x), y).backward()
            if step_time:
                comm.elapse(step_time)
            opt.step()
            opt.zero_grad()
            if watch is not None:
                watch(opt)
        if sent is not None:
            sent[opt.ctx.index] = comm.bytes_sent - before
        opt.finish()
        return opt

    return [r for r in distsgd.simulate_ranks(algorithm, n, body)
            if isinstance(r, distsgd.DistributedOptimizer)]


def states(opts: list[distsgd.DistributedOptimizer]) -> list[torch.Tensor]:
    return [o.ctx.flat.get() for o in opts]


def local_sgd_alone(worker: int, steps: int, lr: float = 0.1) -> torch.Tensor:
    """Worker `worker`'s model after `steps` of plain SGD on its own batches: no communication."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = batch(worker, step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# Settings under which an algorithm whose default exchange comes later than CONFORMANCE_STEPS
# exchanges within them (the check below says when one is missing).
COMMUNICATES_WITHIN: dict[str, dict[str, str]] = {}
CONFORMANCE_STEPS = 12


def check_communicates(name: str, workers: int = 4) -> None:
    """Fail unless algorithm `name` visibly communicates within a few steps: every worker sends
    bytes, and the models differ from independent SGD on each worker's own batches (all of them
    for a synchronous algorithm; at least one for an asynchronous one, where a worker may receive
    nothing in a few steps). An algorithm that does nothing passes the other conformance tests."""
    algorithm = algorithms.create(name, COMMUNICATES_WITHIN.get(name))
    sent: dict[int, int] = {}
    opts = simulate(workers, algorithm, CONFORMANCE_STEPS, step_time=0.01, sent=sent)
    silent = sorted(i for i in range(workers) if not sent.get(i))
    assert not silent, f"{name}: workers {silent} sent no bytes in {CONFORMANCE_STEPS} steps"
    alone = [o.ctx.index for o in opts if torch.allclose(
        o.ctx.flat.get(), local_sgd_alone(o.ctx.index, CONFORMANCE_STEPS), rtol=1e-5, atol=1e-6)]
    moved = len(opts) - len(alone)
    hint = (f"; if it exchanges later than step {CONFORMANCE_STEPS} by default, give it settings "
            "in COMMUNICATES_WITHIN")
    if algorithm.synchronous:
        assert not alone, (f"{name}: workers {alone} end exactly where SGD on their own batches "
                           f"does, as if nothing was exchanged" + hint)
    else:
        assert moved, (f"{name}: every worker ends exactly where SGD on its own batches does, as "
                       f"if nothing was exchanged" + hint)


# ------------------------------------------------------------------------- conformance suite
@pytest.mark.parametrize("name", sorted(algorithms.REGISTRY))
class TestConformance:
    def test_config_is_frozen(self, name: str) -> None:
        config = algorithms.create(name)
        for f in dataclasses.fields(config):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(config, f.name, f.default)

    def test_trains_in_simulator_to_finite_values(self, name: str) -> None:
        opts = simulate(4, algorithms.create(name), steps=12)
        assert all(torch.isfinite(s).all() for s in states(opts))

    def test_communicates(self, name: str) -> None:
        check_communicates(name)

    def test_replays_bit_for_bit(self, name: str) -> None:
        # With compute time charged, asynchronous messages arrive (and are merged) during the run.
        a = states(simulate(4, algorithms.create(name), steps=8, momentum=0.9, step_time=0.01))
        b = states(simulate(4, algorithms.create(name), steps=8, momentum=0.9, step_time=0.01))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    def test_bad_hyperparameter_names_it_and_its_range(self, name: str) -> None:
        cls = algorithms.get(name)
        checked = 0
        for f in dataclasses.fields(cls):
            low = f.metadata.get("low")
            if low is None:
                continue
            bad = algorithms.parse_value(cls, f.name, str(low - 1 if not f.metadata["low_open"]
                                                          else low))
            with pytest.raises(UsageError, match=rf"{f.name}={bad!r} is out of range"):
                cls(**{f.name: bad})
            checked += 1
        with pytest.raises(UsageError, match="no hyperparameter 'nonsense'"):
            algorithms.create(name, {"nonsense": "1"})
        assert checked == sum(1 for f in dataclasses.fields(cls) if f.metadata.get("low")
                              is not None)

    def test_documented(self, name: str) -> None:
        cls = algorithms.get(name)
        assert cls.paper and cls.sends and cls.__doc__
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True)
class DoNothing(distsgd.Algorithm):
    """Fills no hook: every worker trains alone (what the conformance check must reject)."""

    name = "do-nothing"
    paper = "none"
    sends = "nothing"


@dataclasses.dataclass(frozen=True)
class SendsAndIgnores(distsgd.Algorithm):
    """Sends its model to the next worker and throws away what it receives."""

    name = "sends-and-ignores"
    paper = "none"
    sends = "|x| to the next worker per step"
    synchronous = False

    def after_step(self, ctx: algorithms.WorkerContext, state: Any) -> None:
        x = ctx.flat.get()
        ctx.comm.send(x, ctx.worker_ranks[(ctx.index + 1) % ctx.workers])
        while ctx.comm.poll(torch.empty_like(x)) is not None:
            pass


@dataclasses.dataclass(frozen=True)
class ReducesAndIgnores(distsgd.Algorithm):
    """All-reduces a copy of its gradients every step and keeps its own."""

    name = "reduces-and-ignores"
    paper = "none"
    sends = "an all-reduce of |x| per step"

    def after_backward(self, ctx: algorithms.WorkerContext, state: Any) -> None:
        ctx.comm.all_reduce_(ctx.flat.grad_buffer().clone(), group=ctx.workers_group)


@pytest.mark.parametrize("cls, complaint", [
    (DoNothing, r"workers \[0, 1, 2, 3\] sent no bytes"),
    (SendsAndIgnores, "every worker ends exactly where SGD on its own batches does"),
    (ReducesAndIgnores, r"workers \[0, 1, 2, 3\] end exactly where SGD on their own batches"),
])
def test_the_communication_check_rejects_an_algorithm_that_does_not_communicate(
    cls: type[distsgd.Algorithm], complaint: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(algorithms.REGISTRY, cls.name, cls)
    with pytest.raises(AssertionError, match=complaint):
        check_communicates(cls.name)
    # and the same check holds the registered ones (TestConformance.test_communicates)
    check_communicates("easgd")


def test_unknown_algorithm_lists_the_choices() -> None:
    valid = ", ".join(sorted(algorithms.REGISTRY))
    assert "allreduce, async-sparse, crossover" in valid
    with pytest.raises(UsageError,
                       match=f"unknown algorithm 'allreduse'.*; valid choices: {valid}$"):
        algorithms.get("allreduse")


# --------------------------------------------------------------------------- allreduce
def test_allreduce_equals_one_worker_on_the_union_batch() -> None:
    n, steps = 4, 6
    opts = simulate(n, distsgd.AllReduce(), steps, momentum=0.9)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        xs, ys = zip(*(batch(r, step) for r in range(n)), strict=True)
        # Equal batch sizes: the mean of the workers' mean losses is the union's mean loss.
        nn.functional.cross_entropy(model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
        opt.zero_grad()
    reference = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for s in states(opts):
        # float32, summed in another order than the union batch: rounding only.
        torch.testing.assert_close(s, reference, atol=1e-6, rtol=1e-5)


def test_allreduce_averages_batchnorm_buffers() -> None:
    def body(comm: Comm) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
        opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                           distsgd.AllReduce(), comm=comm)
        x, y = batch(comm.rank, 0, size=8)
        nn.functional.cross_entropy(model(x + comm.rank), y).backward()
        opt.step()
        return opt.ctx.flat.get()

    finals = SimWorld(3).run(body)
    assert all(torch.equal(finals[0], f) for f in finals[1:])


# --------------------------------------------------------------------------- local-sgd
def test_local_sgd_with_period_one_equals_allreduce() -> None:
    a = states(simulate(4, distsgd.LocalSGD(period=1), steps=6))
    b = states(simulate(4, distsgd.AllReduce(), steps=6))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)  # summation order only


def test_local_sgd_averages_exactly_every_period() -> None:
    seen: list[tuple[int, float]] = []

    def watch(opt: distsgd.DistributedOptimizer) -> None:
        seen.append((opt.ctx.step, float(opt.ctx.flat.get().sum())))

    opts = simulate(3, distsgd.LocalSGD(period=3), steps=6, watch=watch)
    by_step: dict[int, set[float]] = {}
    for step, value in seen:
        by_step.setdefault(step, set()).add(value)
    assert len(by_step[3]) == 1 and len(by_step[6]) == 1  # identical right after averaging
    assert len(by_step[2]) == 3  # apart in between
    assert len({float(s.sum()) for s in states(opts)}) == 1


# ------------------------------------------------------------------------------- easgd
def test_easgd_conserves_workers_plus_center_without_gradient_steps() -> None:
    n = 4
    opts = simulate(n, distsgd.EASGD(period=2, alpha=0.3), steps=0, lr=0.0, perturb=1.0)
    before = sum(states(opts)) + opts[0].algorithm_state.center
    opts = simulate(n, distsgd.EASGD(period=2, alpha=0.3), steps=10, lr=0.0, perturb=1.0)
    after = sum(states(opts)) + opts[0].algorithm_state.center
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert all(torch.equal(o.algorithm_state.center, opts[0].algorithm_state.center) for o in opts)
    # and the workers were pulled towards the center
    spread = [float((s - opts[0].algorithm_state.center).norm()) for s in states(opts)]
    assert max(spread) < 1.0 * math.sqrt(opts[0].ctx.flat.numel)


def test_easgd_with_alpha_zero_is_independent_local_sgd() -> None:
    opts = simulate(3, distsgd.EASGD(period=1, alpha=0.0), steps=5, momentum=0.9)
    for rank, s in enumerate(states(opts)):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(5):
            x, y = batch(rank, step)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        assert torch.equal(s, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def test_easgd_warns_outside_the_stability_region() -> None:
    assert distsgd.EASGD(alpha=0.9).validate(workers=4, lr=1.9)
    assert not distsgd.EASGD().validate(workers=4, lr=0.1)


# --------------------------------------------------------------------------------- sgp
@pytest.mark.parametrize("peers", [1, 2])
def test_sgp_conserves_numerators_and_weights(peers: int) -> None:
    n = 8
    start = simulate(n, distsgd.SGP(peers=peers), steps=0, lr=0.0, perturb=1.0)
    end = simulate(n, distsgd.SGP(peers=peers), steps=5, lr=0.0, perturb=1.0)
    torch.testing.assert_close(sum(o.algorithm_state.x for o in end),
                               sum(o.algorithm_state.x for o in start), atol=1e-5, rtol=0)
    assert sum(o.algorithm_state.w for o in end) == pytest.approx(n, abs=1e-12)
    if peers == 1:
        assert all(o.algorithm_state.w == 1.0 for o in end)  # regular graph, halves: exactly 1


def test_sgp_reaches_the_exact_average_in_log2_n_rounds() -> None:
    n = 8
    start = states(simulate(n, distsgd.SGP(), steps=0, lr=0.0, perturb=1.0))
    target = sum(start) / n
    end = states(simulate(n, distsgd.SGP(), steps=3, lr=0.0, perturb=1.0))
    for z in end:
        torch.testing.assert_close(z, target, atol=1e-6, rtol=0)  # float32 rounding only
    two = states(simulate(n, distsgd.SGP(), steps=2, lr=0.0, perturb=1.0))
    assert max(float((z - target).abs().max()) for z in two) > 1e-3  # not before


def test_sgp_rejects_more_peers_than_the_graph_has() -> None:
    with pytest.raises(UsageError, match="peers=3 is out of range for 4 workers"):
        distsgd.SGP(peers=3).validate(workers=4, lr=0.1)


# --------------------------------------------------------------------------- crossover
@pytest.mark.parametrize("settings", [{}, {"segments": 1}, {"segments": 4}])
def test_crossover_preserves_the_average_model(settings: dict[str, Any]) -> None:
    n = 6
    start = states(simulate(n, distsgd.Crossover(**settings), steps=0, lr=0.0, perturb=1.0))
    end = states(simulate(n, distsgd.Crossover(**settings), steps=6, lr=0.0, perturb=1.0))
    torch.testing.assert_close(sum(end) / n, sum(start) / n, atol=1e-6, rtol=0)
    assert mixing_distance(end) < mixing_distance(start)


def mixing_distance(xs: list[torch.Tensor]) -> float:
    from distsgd import mixing

    return mixing.consensus_distance(xs)


class CountingComm:
    """Wraps a Comm and counts what each worker receives and sends."""

    def __init__(self, inner: Comm) -> None:
        self.inner, self.received, self.sent = inner, 0, 0

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.sent += 1
        self.inner.send(tensor, dst)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def recv(self, out: torch.Tensor, src: int | None = None, timeout: float | None = None) -> int:
        self.received += 1
        return self.inner.recv(out, src, timeout)

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
                 timeout: float | None = None) -> tuple[frozenset[int], frozenset[int]]:
        self.sent, self.received = self.sent + len(sends), self.received + len(recvs)
        return self.inner.exchange(sends, recvs, timeout)


@pytest.mark.parametrize("fair, segments", [(True, 3), (True, "blocks"), (False, 3)])
def test_crossover_message_counts(fair: bool, segments: int | str) -> None:
    n, steps = 5, 4

    def body(comm: Comm) -> tuple[int, int]:
        counting = CountingComm(comm)
        model = make_model()
        opt = distsgd.DistributedOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1),
            distsgd.Crossover(segments=segments, fair=fair), comm=counting)
        for step in range(steps):
            x, y = batch(comm.rank, step)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return counting.received, len(opt.algorithm_state.bounds), counting.sent

    counts = SimWorld(n).run(body)
    m = counts[0][1]
    # Exactly one copy in per segment per step for every worker, fair or not (the reference's
    # ablation lets each worker pick whom it receives from).
    assert all(c[:2] == (m * steps, m) for c in counts)
    if fair:  # and exactly one copy out
        assert all(c[2] == m * steps for c in counts)
    else:  # as many in total, but unevenly spread
        assert sum(c[2] for c in counts) == n * m * steps
        assert len({c[2] for c in counts}) > 1


def test_hierarchical_crossover_with_one_group_equals_allreduce() -> None:
    a = states(simulate(4, distsgd.Crossover(groups=1), steps=6, momentum=0.9))
    b = states(simulate(4, distsgd.AllReduce(), steps=6, momentum=0.9))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)  # the same all-reduce on the same group: bit for bit


def test_hierarchical_crossover_keeps_groups_identical() -> None:
    # Three groups of two: with only two leaders the derangement is a swap and the leaders would
    # reach the exact average, hiding whether groups can differ.
    end = states(simulate(6, distsgd.Crossover(groups=3), steps=5))
    assert all(torch.equal(end[i], end[i + 1]) for i in (0, 2, 4))
    assert not torch.equal(end[0], end[2]) and not torch.equal(end[2], end[4])


def test_crossover_rejects_bad_segments_and_groups() -> None:
    with pytest.raises(UsageError, match="segments='chunks'"):
        distsgd.Crossover(segments="chunks")
    with pytest.raises(UsageError, match="segments=0"):
        distsgd.Crossover(segments=0)
    with pytest.raises(UsageError, match="groups=5 is out of range for 4 workers"):
        distsgd.Crossover(groups=5).validate(workers=4, lr=0.1)
