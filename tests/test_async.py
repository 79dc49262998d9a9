"""The asynchronous algorithms: exact references, invariants, stragglers and replay (simulator).

Each reference states its tolerance: "exact" means bit for bit; where two computations differ only
in how a float sum is rounded (a + (b − a) is b in real arithmetic, not always in float32), the
tolerance is a few float32 ulps of the parameters' size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import batch, make_model
from torch import nn

import distsgd
from distsgd import checkpoint, mixing
from distsgd.algorithms.downpour import Downpour
from distsgd.algorithms.ps import SERVICE, SERVICES, Shard, check_header, wire
from distsgd.comm.base import Comm
from distsgd.comm.sim import SimWorld
from distsgd.errors import ProtocolError

pytestmark = pytest.mark.timeout(120)
FLOAT32_ROUNDING = dict(atol=1e-6, rtol=1e-5)


def simulate(n: int, algorithm: distsgd.Algorithm, steps: int, *, lr: float = 0.1,
             compute: Callable[[int], float] = lambda rank: 1e-3, perturb: float = 0.0,
             watch: Callable[[SimWorld, distsgd.DistributedOptimizer], None] | None = None,
             ) -> tuple[SimWorld, list[Any]]:
    """`n` workers (plus the algorithm's servers), each taking `steps` steps of `compute(i)`."""
    world = SimWorld(distsgd.Roles.of(algorithm, n).world_size)

    def body(comm: Comm, roles: distsgd.Roles) -> Any:
        model = make_model()
        if roles.is_server(comm.rank):
            return distsgd.serve(model, algorithm, lr=lr, comm=comm)
        opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=lr),
                                           algorithm, comm=comm, seed=3)
        index = opt.ctx.index
        if perturb:
            g = torch.Generator().manual_seed(index)
            opt.ctx.flat.set_(opt.ctx.flat.get() + perturb * torch.randn(opt.ctx.flat.numel,
                                                                         generator=g))
        for step in range(steps):
            x, y = batch(index, step)
            loss = nn.functional.cross_entropy(model(x), y)
            (loss * (lr > 0)).backward()
            comm.elapse(compute(index))
            opt.step()
            opt.zero_grad()
            if watch is not None:
                watch(world, opt)
        opt.finish()
        return opt

    return world, distsgd.simulate_ranks(algorithm, n, body, world=world)


def workers_of(results: list[Any]) -> list[distsgd.DistributedOptimizer]:
    return [r for r in results if isinstance(r, distsgd.DistributedOptimizer)]


def plain_sgd(steps: int, lr: float = 0.1, worker: int = 0) -> torch.Tensor:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = batch(worker, step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def server_model(results: list[Any]) -> torch.Tensor:
    opt = workers_of(results)[0]
    x, _ = opt.algorithm_state.client.snapshot()
    return x


# ---------------------------------------------------------------------------- references
def test_one_worker_downpour_with_period_one_is_plain_sgd() -> None:
    _, results = simulate(1, Downpour(period=1), steps=8)
    reference = plain_sgd(8)
    # The server adds the worker's update u = x' − x to x̃ = x: x + (x' − x) rounds to x' in
    # float32 unless the subtraction itself rounded, hence rounding-level tolerance.
    torch.testing.assert_close(server_model(results), reference, **FLOAT32_ROUNDING)
    torch.testing.assert_close(workers_of(results)[0].ctx.flat.get(), reference,
                               **FLOAT32_ROUNDING)


def test_ssp_with_s0_is_synchronous_sgd_on_the_same_batches() -> None:
    n, steps = 4, 6
    _, results = simulate(n, distsgd.create("ssp", s=0), steps,
                          compute=lambda i: 1e-3 * (1 + i))  # unequal speeds: s=0 must not care
    _, sync = simulate(n, distsgd.AllReduce(), steps)
    for ssp_worker, ar_worker in zip(workers_of(results), workers_of(sync), strict=True):
        # Σ u_i / N applied one push at a time against one all-reduce: summation order only.
        torch.testing.assert_close(ssp_worker.ctx.flat.get(), ar_worker.ctx.flat.get(),
                                   **FLOAT32_ROUNDING)


def test_eamsgd_with_delta_zero_is_easgd_async_bit_for_bit() -> None:
    _, a = simulate(3, distsgd.create("eamsgd", delta=0.0, period=2), steps=7,
                    compute=lambda i: 1e-3 * (1 + i))
    _, b = simulate(3, distsgd.create("easgd-async", period=2), steps=7,
                    compute=lambda i: 1e-3 * (1 + i))
    for x, y in zip(workers_of(a), workers_of(b), strict=True):
        assert torch.equal(x.ctx.flat.get(), y.ctx.flat.get())
    assert torch.equal(server_model(a), server_model(b))


def test_eamsgd_momentum_changes_the_trajectory() -> None:
    _, a = simulate(2, distsgd.create("eamsgd", delta=0.9, period=2), steps=5)
    _, b = simulate(2, distsgd.create("easgd-async", period=2), steps=5)
    assert not torch.equal(workers_of(a)[0].ctx.flat.get(), workers_of(b)[0].ctx.flat.get())


def test_dense_async_sparse_without_decay_or_momentum_is_downpour() -> None:
    settings = {"ratio": 1.0, "gamma": 1.0, "lam": 1.0, "mu": 0.0}
    _, sparse = simulate(3, distsgd.create("async-sparse", **settings), steps=6,
                         compute=lambda i: 1e-3 * (1 + i))
    _, downpour = simulate(3, Downpour(period=1), steps=6, compute=lambda i: 1e-3 * (1 + i))
    # x̃ − ηg at the server against x̃ + ((x − ηg) − x): rounding only.
    torch.testing.assert_close(server_model(sparse), server_model(downpour), **FLOAT32_ROUNDING)


def test_sharded_server_gives_the_same_model() -> None:
    _, one = simulate(2, Downpour(), steps=5, compute=lambda i: 1e-3 * (1 + i))
    _, two = simulate(2, distsgd.create("downpour", shards=2), steps=5,
                      compute=lambda i: 1e-3 * (1 + i))
    assert torch.equal(server_model(one), server_model(two))  # elementwise: bit for bit


# ----------------------------------------------------------------------- server variants
def _shard(x: torch.Tensor) -> Shard:
    return Shard(x.clone(), 0, x.numel(), (1,))


@pytest.mark.parametrize("variant", ["average", "moving-average", "momentum"])
def test_downpour_variant_server_rules(variant: str) -> None:
    algo = Downpour(variant=variant, delta=0.5, rate=0.25)
    x0 = torch.tensor([1.0, -2.0])
    shard = _shard(x0)
    shard.rule = algo.server_init(shard, None)  # type: ignore[arg-type]
    updates = [torch.tensor([0.5, 0.5]), torch.tensor([-1.0, 0.0]), torch.tensor([0.25, 1.0])]
    centers, z, v, x = [x0], x0.clone(), torch.zeros(2), x0.clone()
    for t, u in enumerate(updates, start=1):
        algo.apply(shard, u, 0, None)  # type: ignore[arg-type]
        shard.version += 1
        if variant == "momentum":  # Nesterov at the server
            v = 0.5 * v + u
            x = x + u + 0.5 * v
        else:
            x = x + u
        centers.append(x)
        if variant == "average":
            z = z * (1 - 1 / (t + 1)) + x / (t + 1)
        elif variant == "moving-average":
            z = z * 0.75 + x * 0.25
    torch.testing.assert_close(shard.x, x)
    if variant == "average":  # ADOWNPOUR's z is the plain mean of x̃ over its versions
        torch.testing.assert_close(algo.server_evaluated(shard), sum(centers) / len(centers))
    if variant != "momentum":
        torch.testing.assert_close(algo.server_evaluated(shard), z)


# ---------------------------------------------------------------------- service requests
def test_service_requests_by_message_answer_what_the_simulator_reads_in_place(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The SERVICE message (real processes) and the in-place read (simulator) give the same
    snapshot and checkpoint state, bit for bit, and neither counts a byte. One worker, so that no
    other push can reach the server between the two reads."""
    seen: list[tuple[Any, Any]] = []

    def both_ways(world: SimWorld, opt: distsgd.DistributedOptimizer) -> None:
        client, comm = opt.algorithm_state.client, opt.ctx.comm
        before = comm.bytes_sent
        in_place = client.snapshot(), client.server_states()
        asked: list[int] = []  # the servers asked by message
        with monkeypatch.context() as m:
            m.setattr(type(comm), "observe", lambda self, rank, key: None)
            m.setattr(wire, "recv_service_reply",
                      lambda comm, src, real=wire.recv_service_reply: (asked.append(src),
                                                                       real(comm, src))[1])
            by_message = client.snapshot(), client.server_states()
        assert asked == [0, 1, 0, 1]  # each shard, for the snapshot then the checkpoint
        assert comm.bytes_sent == before  # the servers' counts are in what they answered
        seen.append((in_place, by_message))

    simulate(1, distsgd.create("downpour", variant="average", shards=2), steps=3,
             watch=both_ways)
    assert len(seen) == 3
    for ((x, figures), states), ((y, figures_y), states_y) in seen:
        assert torch.equal(x, y) and figures == figures_y
        assert torch.equal(checkpoint.to_bytes(states[0]), checkpoint.to_bytes(states_y[0]))
        assert torch.equal(checkpoint.to_bytes(states[1]), checkpoint.to_bytes(states_y[1]))
    assert not torch.equal(seen[0][0][0][0], seen[-1][0][0][0])  # the server did move


@pytest.mark.parametrize("request_number, problem", [
    (len(SERVICES), f"unknown service request {len(SERVICES)}; valid: 0..{len(SERVICES) - 1}"),
    (0.5, "kind, version and count must be whole numbers"),
])
def test_a_server_rejects_an_unknown_service_request(request_number: float,
                                                     problem: str) -> None:
    header = torch.tensor([SERVICE, 0, 0, request_number], dtype=torch.float64)
    assert check_header(torch.tensor([SERVICE, 0, 0, 1], dtype=torch.float64), version=0,
                        size=10, src=1, rank=0).number == SERVICES.index("checkpoint")
    with pytest.raises(ProtocolError, match=re.escape(
            f"server rank 0 rejected a header from rank 1: {problem}")):
        check_header(header, version=0, size=10, src=1, rank=0)


# ------------------------------------------------------------------------- gossip (gosgd)
def _in_flight(world: SimWorld) -> list[tuple[torch.Tensor, float]]:
    slots = mixing.weight_slots(torch.float32)
    out = []
    for w in world._workers:
        for m in w.inbox:
            out.append((m.payload[:-slots], mixing.unpack_weight(m.payload[-slots:])))
    return out


def test_gosgd_weights_in_flight_included_sum_to_exactly_one() -> None:
    sums: list[float] = []
    opts: dict[int, distsgd.DistributedOptimizer] = {}

    def watch(world: SimWorld, opt: distsgd.DistributedOptimizer) -> None:
        opts[opt.ctx.index] = opt
        if len(opts) == 4:
            weights = [o.algorithm_state.weight for o in opts.values()]
            weights += [a for _, a in _in_flight(world)]
            sums.append(sum(weights))

    simulate(4, distsgd.create("gosgd", p=0.5), steps=60, compute=lambda i: 1e-3 * (1 + i % 2),
             watch=watch)
    assert len(sums) > 100
    assert all(s == 1.0 for s in sums)  # halvings and sums of dyadic fractions: exact


def test_gosgd_without_gradients_conserves_the_weighted_sum_and_converges() -> None:
    records: list[tuple[torch.Tensor, float]] = []
    opts: dict[int, distsgd.DistributedOptimizer] = {}

    def watch(world: SimWorld, opt: distsgd.DistributedOptimizer) -> None:
        opts[opt.ctx.index] = opt
        if len(opts) < 4:
            return
        pairs = [(o.ctx.flat.get().double(), o.algorithm_state.weight) for o in opts.values()]
        pairs += [(x.double(), a) for x, a in _in_flight(world)]
        total = sum(a * x for x, a in pairs)
        records.append((total, mixing.consensus_distance([x for x, _ in pairs[:4]])))

    simulate(4, distsgd.create("gosgd", p=0.5), steps=150, lr=0.0, perturb=1.0,
                          watch=watch)
    first = records[0][0]
    for total, _ in records:
        torch.testing.assert_close(total, first, atol=1e-5, rtol=0)  # float32 models
    assert records[-1][1] < 1e-2 * records[0][1]  # the workers converged to it


# ------------------------------------------------------------------------------- ssp bound
@pytest.mark.parametrize("s", [0, 1, 3])
def test_ssp_clock_gap_never_exceeds_s_under_a_straggler(s: int) -> None:
    algorithm = distsgd.create("ssp", s=s)
    steps: dict[int, int] = {}
    gaps: list[int] = []

    def watch(world: SimWorld, opt: distsgd.DistributedOptimizer) -> None:
        steps[opt.ctx.index] = opt.ctx.step
        if len(steps) == 4:
            gaps.append(max(steps.values()) - min(steps.values()))

    _, results = simulate(4, algorithm, steps=20, compute=lambda i: 4e-3 if i == 2 else 1e-3,
                          watch=watch)
    figures = next(r for r in results if isinstance(r, dict))
    assert figures["ssp_max_clock_gap"] <= s
    assert figures["ssp_max_clock_gap"] == s  # a 4x straggler pushes the gap to the bound
    # Seen from outside too: a worker never finishes a step more than s + 1 ahead (it may have
    # finished step c while the slowest is still computing step c − s).
    assert max(gaps) <= s + 1


# -------------------------------------------------------------------------------- replay
@pytest.mark.parametrize("algorithm", ["downpour", "easgd-async", "eamsgd", "ssp",
                                       "async-sparse", "gosgd"])
def test_runs_with_stragglers_replay_bit_for_bit(algorithm: str, tmp_path: Path) -> None:
    options = dict(algorithm=algorithm, workers=4, steps=30, eval_every=10, model="mlp",
                   stragglers=((1, 4.0),), slowdown="lognormal:0.3", compute_time="flops")
    a = distsgd.train(**options, out=str(tmp_path / "a"))
    b = distsgd.train(**options, out=str(tmp_path / "b"))
    for x, y in zip(a.workers, b.workers, strict=True):
        assert torch.equal(x.state, y.state)
    strip = [{k: v for k, v in r.items() if k != "real_time_s"} for r in a.metrics]
    assert strip == [{k: v for k, v in r.items() if k != "real_time_s"} for r in b.metrics]
    steps = [w.steps for w in a.workers if w.steps]  # servers take no steps
    assert steps[1] < steps[0]  # the straggler took fewer of the shared budget


def test_sparse_pushes_are_counted_as_indices_and_values(tmp_path: Path) -> None:
    result = distsgd.train(algorithm="async-sparse", workers=2, steps=10, model="mlp",
                           hyperparameters={"ratio": 0.01}, out=str(tmp_path))
    server = result.workers[0]
    worker = result.workers[1]
    numel = worker.state.numel()
    k = round(0.01 * numel)
    pushes = worker.steps
    # Each push: a 32-byte header and k (value, index) pairs of 4 + 4 bytes; the pulls' replies
    # come from the server.
    assert worker.bytes_by_verb["send"] == pushes * (32 + 8 * k) + (pushes + 2) * 32
    assert server.bytes_by_verb["send"] > pushes * 4 * numel
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["staleness_mean"] is not None


@pytest.mark.parametrize("shards", [1, 2])
def test_the_summary_staleness_equals_the_servers_own_figures(shards: int,
                                                               tmp_path: Path) -> None:
    from distsgd.algorithms.ps import merge_figures

    result = distsgd.train(algorithm="ssp", workers=3, steps=20, model="mlp",
                           hyperparameters={"shards": shards}, stragglers=((1, 3.0),),
                           out=str(tmp_path))
    servers = merge_figures([w.figures for w in result.workers if w.figures])
    for key in ("staleness_mean", "staleness_max", "staleness_histogram", "ssp_max_clock_gap",
                "server_bytes_sent"):
        assert result.summary[key] == servers[key]


def test_a_slow_link_slows_only_the_algorithms_that_use_it(tmp_path: Path) -> None:
    # Rank 0 is downpour's server: a slow link to worker 3 (rank 3) delays that worker's
    # round trips. Crossing no other link, it leaves every other link's timing alone.
    base = dict(workers=3, steps=10, model="mlp", eval_every=5)
    fast = distsgd.train(algorithm="downpour", **base, out=str(tmp_path / "fast"))
    slow = distsgd.train(algorithm="downpour", **base, links=[(0, 3, 1e-3, 1e6)],
                         out=str(tmp_path / "slow"))
    assert slow.workers[3].virtual_time_s > fast.workers[3].virtual_time_s + 10 * 2e-3
    with pytest.raises(distsgd.UsageError, match="link rank=4 is out of range"):
        distsgd.train(algorithm="downpour", **base, links=[(0, 4, 1e-3, 1e6)],
                      out=str(tmp_path / "bad"))


# ------------------------------------------------------------------- the servers' traffic
def _downpour_server_bytes(workers: int, steps: int, numel: int) -> int:
    """downpour τ = 1, one shard: the server sends nothing but replies to pulls, one at the start
    and one after every push; a reply is x̃ (float32) plus a tail of two float64 (version, lowest
    clock). Budget runs (simulator) and fixed-step runs take workers × steps steps in all."""
    return workers * (1 + steps) * (4 * numel + 16)


def test_server_bytes_sent_is_the_closed_form_and_the_server_ranks_counter(
        tmp_path: Path) -> None:
    result = distsgd.train(algorithm="downpour", workers=2, steps=6, eval_every=3, model="mlp",
                           out=str(tmp_path))
    server, numel = result.workers[0], result.workers[1].state.numel()
    expected = _downpour_server_bytes(2, 6, numel)
    assert result.summary["server_bytes_sent"] == expected
    assert result.metrics[-1]["server_bytes_sent"] == expected
    assert server.bytes_by_verb == {"send": expected}  # the server only sends replies
    assert server.figures["server_bytes_sent"] == expected
    # The workers' own figure leaves the replies out: everything they sent (the initial
    # broadcast, headers, pushes) but the 32-byte DONE header of the last worker to stop, sent
    # after the last evaluation (the other's went before it).
    assert result.summary["bytes_sent"] == sum(sum(w.bytes_by_verb.values())
                                               for w in result.workers[1:]) - 32
    sent = [m["server_bytes_sent"] for m in result.metrics]
    assert sent[0] == 2 * (4 * numel + 16) and sent == sorted(sent)  # so far: only grows


def test_server_bytes_sent_sums_the_shards(tmp_path: Path) -> None:
    one = distsgd.train(algorithm="downpour", workers=2, steps=4, model="mlp",
                        out=str(tmp_path / "one"))
    two = distsgd.train(algorithm="downpour", workers=2, steps=4, model="mlp",
                        hyperparameters={"shards": 2}, out=str(tmp_path / "two"))
    # Each shard replies with its piece of x̃ and its own 16-byte tail.
    tails = 2 * (1 + 4) * 16
    assert two.summary["server_bytes_sent"] == one.summary["server_bytes_sent"] + tails
    assert two.summary["server_bytes_sent"] == sum(w.bytes_by_verb.get("send", 0)
                                                   for w in two.workers[:2])


@pytest.mark.processes
@pytest.mark.timeout(240)
def test_server_bytes_sent_on_processes_equals_the_simulators(tmp_path: Path) -> None:
    # One worker: its last evaluation asks the server after every reply has been sent, so the
    # "so far" figure is the final one on both backends (with more workers on processes, worker
    # 0 may ask while another worker's last pull is still unanswered).
    options = dict(algorithm="downpour", workers=1, steps=5, eval_every=5, model="mlp")
    sim = distsgd.train(**options, backend="sim", out=str(tmp_path / "sim"))
    real = distsgd.train(**options, backend="processes", out=str(tmp_path / "real"))
    numel = sim.workers[1].state.numel()
    assert real.summary["server_bytes_sent"] == sim.summary["server_bytes_sent"] == (
        _downpour_server_bytes(1, 5, numel))
    assert [m["server_bytes_sent"] for m in real.metrics] == [
        m["server_bytes_sent"] for m in sim.metrics]
