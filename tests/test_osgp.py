"""OSGP: sgp with ``overlap`` (Assran et al. 2019; the reference code's ``overlap``/``synch_freq``).

Each step's push-sum share leaves in the background and is mixed in by its receiver at the latest
`synch_freq` + 1 steps later. What these tests pin: push-sum mass (Σx, Σw) is conserved counting
what is still on the wire; ``overlap=false`` is today's sgp bit for bit; real processes equal the
simulator exactly where the result cannot depend on arrival times (``synch_freq=0``), and where it
can (``synch_freq>0``) they agree on everything that does not (bytes, the conserved mass).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import batch, make_model
from torch import nn

import distsgd
from distsgd import launch, mixing, topology
from distsgd.algorithms.base import WorkerContext
from distsgd.algorithms.sgp import SGP, PushSumState
from distsgd.comm.base import Comm
from distsgd.comm.sim import NetworkModel, SimWorld
from distsgd.errors import UsageError

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class TodaysSGP(SGP):
    """sgp's mixing as it was before overlap existed (commit fa70764), kept here verbatim as
    the reference that ``overlap=false`` must equal bit for bit."""

    def after_step(self, ctx: WorkerContext, state: PushSumState) -> None:
        z_new = ctx.flat.get()
        state.x.add_(z_new - state.z)
        n, me = ctx.workers, ctx.index
        if n > 1:
            out_peers = topology.exponential_out_peers(me, ctx.step, n, self.peers)
            in_peers = topology.exponential_in_peers(me, ctx.step, n, self.peers)
            share, w_share = mixing.push_sum_share(state.x, state.w, len(out_peers) + 1)
            message = torch.cat([share, mixing.pack_weight(w_share, share.dtype, share.device)])
            for peer in out_peers:
                ctx.comm.send(message, ctx.worker_ranks[peer])
            state.x, state.w = share.mul_(1), w_share * 1
            slots = mixing.weight_slots(share.dtype)
            inbox = torch.empty_like(message)
            for peer in in_peers:
                ctx.comm.recv(inbox, src=ctx.worker_ranks[peer])
                state.x.add_(inbox[:-slots])
                state.w += mixing.unpack_weight(inbox[-slots:])
        state.z = mixing.debias(state.x, state.w)
        ctx.flat.set_(state.z)


def run(algorithm: distsgd.Algorithm, n: int, steps: int, *, lr: float = 0.1,
        perturb: float = 0.0, step_time: float = 0.0, network: NetworkModel | None = None,
        finish: bool = True, comm: Comm | None = None,
        before_step: Callable[[distsgd.DistributedOptimizer], None] | None = None,
        ) -> list[distsgd.DistributedOptimizer]:
    """Train `n` simulated workers on the tiny model (or, with `comm`, this one real worker);
    `perturb` moves each worker off the common start; `step_time`: virtual compute per step;
    `before_step` sees each worker's optimizer before each step."""

    def body(comm: Comm) -> distsgd.DistributedOptimizer:
        model = make_model()
        opt = distsgd.DistributedOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=lr), algorithm, comm=comm, seed=7)
        if perturb:
            g = torch.Generator().manual_seed(comm.rank)
            opt.ctx.flat.set_(opt.ctx.flat.get() + perturb * torch.randn(
                opt.ctx.flat.numel, generator=g))
            opt.algorithm_state.x, opt.algorithm_state.z = opt.ctx.flat.get(), opt.ctx.flat.get()
        for step in range(steps):
            x, y = batch(comm.rank, step)
            nn.functional.cross_entropy(model(x), y).backward()
            if step_time:
                comm.elapse(step_time)
            if before_step is not None:
                before_step(opt)
            opt.step()
            opt.zero_grad()
        if finish:
            opt.finish()
        return opt

    if comm is not None:
        return [body(comm)]
    world = SimWorld(n, network)
    return world.run(body)


def flat_states(opts: list[distsgd.DistributedOptimizer]) -> list[torch.Tensor]:
    return [o.ctx.flat.get() for o in opts]


# ------------------------------------------------------------------ overlap=false: today's sgp
@pytest.mark.parametrize("peers, n", [(1, 4), (1, 5), (2, 8)])
def test_without_overlap_sgp_is_todays_sgp_bit_for_bit(peers: int, n: int) -> None:
    today = flat_states(run(TodaysSGP(peers=peers), n, steps=9, perturb=0.5))
    ours = flat_states(run(SGP(peers=peers, overlap=False), n, steps=9, perturb=0.5))
    assert SGP() == SGP(overlap=False, synch_freq=0)  # the defaults are today's sgp
    for a, b in zip(today, ours, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ push-sum mass
def in_flight(world: SimWorld) -> tuple[torch.Tensor | float, float]:
    """(Σ numerators, Σ weights) of the sgp messages still on the simulated wire."""
    x: torch.Tensor | float = 0.0
    w = 0.0
    for rank in world.state_dict()["ranks"]:
        for _, _, _, payload in rank["inbox"]:
            slots = mixing.weight_slots(payload.dtype)
            x = x + payload[:-slots]
            w += mixing.unpack_weight(payload[-slots:])
    return x, w


@pytest.mark.parametrize("synch_freq, peers", [(0, 1), (3, 1), (2, 2)])
def test_push_sum_mass_is_conserved_with_messages_in_flight(synch_freq: int, peers: int) -> None:
    n, steps = 8, 7
    # A slow link (10 kB/s against 1 ms of compute a step) keeps several rounds on the wire.
    network = NetworkModel(latency=1e-3, bandwidth=1e4)
    algorithm = SGP(peers=peers, overlap=True, synch_freq=synch_freq)
    total_x = sum(o.algorithm_state.x for o in run(algorithm, n, steps=0, lr=0.0, perturb=1.0))
    world = SimWorld(n, network)
    opts: dict[int, distsgd.DistributedOptimizer] = {}
    seen: dict[str, Any] = {}

    def body(comm: Comm) -> distsgd.DistributedOptimizer:
        opts[comm.rank] = opt = run(algorithm, n, steps=steps, lr=0.0, perturb=1.0,
                                    step_time=1e-3, finish=False, comm=comm)[0]
        # Every worker has taken its steps: count what is held and what is on the wire before
        # any worker drains the wire in finish().
        comm.barrier()
        if comm.rank == 0:
            seen["wire"] = in_flight(world)
            seen["held"] = [(o.algorithm_state.x.clone(), o.algorithm_state.w)
                            for o in opts.values()]
        comm.barrier()
        opt.finish()
        return opt

    end = world.run(body)
    wire_x, wire_w = seen["wire"]
    assert isinstance(wire_x, torch.Tensor) and wire_w > 0  # something was in flight
    # At most synch_freq + 2 rounds in flight (those not yet due, and this step's), each
    # taking k/(k + 1) of what its sender held.
    assert wire_w <= n * (1 - (1 / (peers + 1)) ** (synch_freq + 2)) + 1e-12
    held_x = sum(x for x, _ in seen["held"])
    held_w = sum(w for _, w in seen["held"])
    torch.testing.assert_close(held_x + wire_x, total_x, atol=1e-5, rtol=0)
    assert held_w + wire_w == pytest.approx(n, abs=1e-12)
    # finish() mixes in what was still on the wire: nothing is left there, nothing lost.
    assert in_flight(world)[1] == 0.0
    torch.testing.assert_close(sum(o.algorithm_state.x for o in end), total_x, atol=1e-5, rtol=0)
    assert sum(o.algorithm_state.w for o in end) == pytest.approx(n, abs=1e-12)


def test_a_checkpoint_cut_conserves_mass_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    # Stragglers and a random slowdown make arrivals uneven, so with synch_freq=2 some shares
    # wait on the wire across the cut: the simulator's checkpoint keeps them there.
    options = dict(algorithm="sgp", hyperparameters={"overlap": True, "synch_freq": 2},
                   workers=4, dataset="digits", model="mlp", steps=12, eval_every=4, seed=1,
                   slowdown="lognormal:0.3", stragglers=((1, 2.0),))
    straight = distsgd.train(**options, checkpoint_every=4, out=str(tmp_path / "a"))
    distsgd.train(**options, checkpoint_every=4, stop_after=8, out=str(tmp_path / "b"))
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    flying = [m for r in saved["world"]["ranks"] for m in r["inbox"]]
    assert flying  # at least this step's shares
    slots = mixing.weight_slots(torch.float32)
    held = sum(w["algorithm"]["w"] for w in saved["workers"])
    assert held + sum(mixing.unpack_weight(p[-slots:]) for *_, p in flying) == 4.0
    assert all(entry[2] is None for w in saved["workers"] for entry in w["algorithm"]["pending"])
    resumed = distsgd.resume(str(tmp_path / "b"))
    for a, b in zip(straight.workers, resumed.workers, strict=True):
        assert torch.equal(a.state, b.state) and a.virtual_time_s == b.virtual_time_s


# ------------------------------------------------------------------ what overlap computes
def test_synch_freq_0_is_the_one_step_delayed_push_sum_worked_by_hand() -> None:
    """OSGP with synch_freq=0 (the reference's overlap=True, synch_freq=0), written out for
    every worker at once: after step t, add the shares sent after step t − 1, then send half."""
    n, steps, lr = 5, 6, 0.1
    ours = flat_states(run(SGP(overlap=True), n, steps=steps, lr=lr, perturb=0.5))
    starts = run(SGP(overlap=True), n, steps=0, perturb=0.5)
    x = [o.algorithm_state.x.clone() for o in starts]
    w = [1.0] * n
    z = [xi.clone() for xi in x]
    wire: list[tuple[int, torch.Tensor, float]] = []  # (receiver, x share, w share)
    model = make_model()
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=lr)
    for t in range(steps):
        for i in range(n):
            # A copy: vector_to_parameters makes the parameters views of the vector it is given.
            nn.utils.vector_to_parameters(z[i].clone(), params)
            xb, yb = batch(i, t)
            nn.functional.cross_entropy(model(xb), yb).backward()
            sgd.step()
            sgd.zero_grad()
            x[i].add_(nn.utils.parameters_to_vector(params).detach() - z[i])
        arrived, wire = wire, []
        for i in range(n):
            for dst, xs, ws in arrived:
                if dst == i:
                    x[i].add_(xs)
                    w[i] += ws
            (out,) = topology.exponential_out_peers(i, t, n)
            x[i], w[i] = x[i] / 2, w[i] / 2
            wire.append((out, x[i].clone(), w[i]))
            z[i] = x[i] / w[i]
    for dst, xs, ws in wire:  # finish(): the last shares
        x[dst].add_(xs)
        w[dst] += ws
    for i in range(n):
        assert torch.equal(ours[i], x[i] / w[i])


def test_shares_that_arrive_within_a_step_make_synch_freq_irrelevant() -> None:
    # 1 ms of compute a step, messages across in well under that: every share has arrived
    # when it is first polled, so any synch_freq mixes exactly what synch_freq=0 waits for.
    fast = NetworkModel(latency=1e-5, bandwidth=1e9)
    zero = flat_states(run(SGP(overlap=True), 6, 8, step_time=1e-3, network=fast))
    for tau in (1, 4):
        late = flat_states(run(SGP(overlap=True, synch_freq=tau), 6, 8, step_time=1e-3,
                               network=fast))
        assert all(torch.equal(a, b) for a, b in zip(zero, late, strict=True))


def test_on_a_slow_link_overlap_hides_communication_and_synch_freq_waits_less() -> None:
    # Each 0.1 MB-ish share takes about as long to cross as a step computes (1 ms): without
    # overlap a step costs both, with it about the larger one; synch_freq > 0 waits less still.
    slow = NetworkModel(latency=1e-4, bandwidth=2.5e5)

    def seconds(algorithm: SGP) -> float:
        opts = run(algorithm, 4, 20, step_time=1e-3, network=slow)
        clocks = [o.ctx.comm.now() for o in opts]
        assert all(c is not None for c in clocks)
        return max(c for c in clocks if c is not None)

    plain, osgp, osgp2 = seconds(SGP()), seconds(SGP(overlap=True)), seconds(
        SGP(overlap=True, synch_freq=2))
    assert osgp < 0.75 * plain and osgp2 <= osgp
    # The runs themselves: the same in the simulator every time (virtual time decides arrivals).
    again = flat_states(run(SGP(overlap=True, synch_freq=2), 4, 20, step_time=1e-3,
                            network=slow))
    first = flat_states(run(SGP(overlap=True, synch_freq=2), 4, 20, step_time=1e-3,
                            network=slow))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("tau", [0, 1, 3])
def test_no_share_stays_on_the_wire_past_synch_freq_plus_one_steps(tau: int) -> None:
    # A link so slow that shares pile up: every one is mixed in at the latest synch_freq + 1
    # steps after it was sent, and some stay exactly that long (so it does not wait sooner).
    slow = NetworkModel(latency=1e-4, bandwidth=2e4)
    ages: list[int] = []

    def watch(opt: distsgd.DistributedOptimizer) -> None:
        ages.extend(opt.ctx.step - step for step, _, _ in opt.algorithm_state.pending)

    run(SGP(overlap=True, synch_freq=tau), 4, 12, step_time=1e-3, network=slow,
        before_step=watch)
    assert max(ages) == tau + 1


@pytest.mark.parametrize("settings, words", [
    ({"synch_freq": 2}, "sgp: synch_freq=2 needs overlap=true"),
    ({"overlap": True, "synch_freq": -1}, "sgp: synch_freq=-1 is out of range"),
    ({"overlap": "yes"}, "sgp: overlap='yes'"),
])
def test_bad_overlap_options_are_one_line_usage_errors(settings: dict[str, Any],
                                                       words: str) -> None:
    with pytest.raises(UsageError, match=words) as caught:
        SGP(**settings)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------ real processes
# Starting processes is the slow part (most of this file's time): one launch of 4 runs both
# scenarios, and the same function runs in the simulator for reference.
def _cut(comm: Comm) -> tuple[torch.Tensor, dict[str, int], bool]:
    """OSGP (synch_freq=0, two in-peers a step) for 4 steps, a checkpoint (`state_dict`; real
    processes take the shares still on the wire off it, as a new process could not receive
    them), then 4 more steps: on processes by a new optimizer loaded from that checkpoint (a
    resumed run), in the simulator by the same one (its wire holds the shares; its own cut is
    `test_a_checkpoint_cut_conserves_mass_and_resumes_bit_for_bit`). (The state after finish(),
    bytes by verb, whether every share of the checkpoint was taken off the wire.)"""
    algorithm = SGP(overlap=True, peers=2)

    def optimizer(sync: bool) -> distsgd.DistributedOptimizer:
        model = make_model()
        return distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                            algorithm, comm=comm, seed=7, sync_init=sync)

    before = comm.bytes_by_verb
    opt = optimizer(True)
    g = torch.Generator().manual_seed(comm.rank)  # each worker off the common start
    opt.ctx.flat.set_(opt.ctx.flat.get() + 0.5 * torch.randn(opt.ctx.flat.numel, generator=g))
    opt.algorithm_state.x, opt.algorithm_state.z = opt.ctx.flat.get(), opt.ctx.flat.get()
    for step in range(8):
        if step == 4:
            saved = opt.state_dict()
            taken = all(isinstance(e[2], torch.Tensor)
                        for e in saved["algorithm"]["pending"]) and bool(
                saved["algorithm"]["pending"])
            if comm.now() is None:
                opt = optimizer(False)
                opt.load_state_dict(saved)
        x, y = batch(comm.rank, step)
        nn.functional.cross_entropy(opt.ctx.model(x), y).backward()
        opt.step()
        opt.zero_grad()
    opt.algorithm.finish(opt.ctx, opt.algorithm_state)  # (opt.finish() would close the comm)
    after = comm.bytes_by_verb
    return opt.ctx.flat.get(), {k: v - before.get(k, 0) for k, v in after.items()}, taken


def _mass(comm: Comm, steps: int = 10) -> tuple[torch.Tensor, float, int, int]:
    """OSGP (synch_freq=2) without gradient steps, odd ranks 20 ms slower a step on processes
    so that shares arrive late and `done()` says no; (x, w, bytes sent) after finish(), and the
    oldest share (in steps) seen still on the wire before a step."""
    oldest = [0]
    sent = comm.bytes_sent

    def before_step(opt: distsgd.DistributedOptimizer) -> None:
        if comm.now() is None:
            time.sleep(0.02 * (comm.rank % 2))
        oldest[0] = max([oldest[0], *(opt.ctx.step - s for s, _, _ in opt.algorithm_state.pending)])

    opt = run(SGP(overlap=True, synch_freq=2), comm.world_size, steps, lr=0.0, perturb=1.0,
              comm=comm, before_step=before_step, finish=False)[0]
    opt.algorithm.finish(opt.ctx, opt.algorithm_state)
    return opt.algorithm_state.x, opt.algorithm_state.w, comm.bytes_sent - sent, oldest[0]


def _both(comm: Comm) -> dict[str, Any]:
    return {"cut": _cut(comm), "mass": _mass(comm)}


@pytest.fixture(scope="module")
def on_processes() -> list[dict[str, Any]]:
    return launch.launch(_both, 4, timeout=200)


@pytest.fixture(scope="module")
def in_the_simulator() -> list[dict[str, Any]]:
    return SimWorld(4).run(_both)


@pytest.mark.processes
def test_synch_freq_0_cut_and_resumed_on_processes_equals_the_simulator_bit_for_bit(
        on_processes: list[dict[str, Any]], in_the_simulator: list[dict[str, Any]]) -> None:
    # synch_freq=0 waits for every share at a fixed step, so arrival times cannot matter: the
    # same arithmetic in the same order, point to point only (no all-reduce): exact equality,
    # bytes included, across a cut where processes took the shares off the wire.
    for real, sim in zip(on_processes, in_the_simulator, strict=True):
        (real_state, real_bytes, taken), (sim_state, sim_bytes, _) = real["cut"], sim["cut"]
        assert taken
        assert torch.equal(real_state, sim_state)
        assert real_bytes == sim_bytes


@pytest.mark.processes
def test_synch_freq_2_on_processes_conserves_mass_and_sends_what_the_simulator_sends(
        on_processes: list[dict[str, Any]], in_the_simulator: list[dict[str, Any]]) -> None:
    # With synch_freq > 0 what is mixed in when depends on arrival times, which differ between
    # real processes and the simulator (and between real runs): the models are not compared.
    # What cannot depend on timing is: every step sends its shares (the same bytes), and after
    # finish() every share has been mixed in once (Σx and Σw as at the start).
    n = len(on_processes)
    start = sum(o.algorithm_state.x
                for o in run(SGP(overlap=True), n, steps=0, lr=0.0, perturb=1.0))
    real = [r["mass"] for r in on_processes]
    torch.testing.assert_close(sum(r[0] for r in real), start, atol=1e-5, rtol=0)
    assert sum(r[1] for r in real) == n  # dyadic shares: exact whatever the order
    assert [r[2] for r in real] == [r["mass"][2] for r in in_the_simulator]
    # The even ranks run ahead of the slow odd ones: some share was not there when first
    # asked for (the overlap path ran), and none stayed past synch_freq + 1 steps.
    assert 1 < max(r[3] for r in real) <= 3
