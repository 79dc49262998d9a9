"""The simulator on its own: ordering, virtual time, collectives, failures and exact replay.

No test sleeps: every wait is in virtual time.
"""

from __future__ import annotations

import random

import pytest
import torch

from distsgd.comm.base import current, nbytes, ring_allreduce_bytes, tree_broadcast_children
from distsgd.comm.sim import NetworkModel, SimComm, SimWorld
from distsgd.comm.sim import world as sim
from distsgd.errors import DeadlockError, UsageError, WorkerFailure

pytestmark = pytest.mark.timeout(60)

SLOW = NetworkModel(latency=1e-4, bandwidth=1e6)  # 1 MB/s: transfer times are easy to predict


def _clock(comm: SimComm) -> float:
    now = comm.now()
    assert now is not None  # the simulator always has a virtual clock
    return now


def _suspended(world: SimWorld) -> list[int]:
    """Ranks whose worker is still suspended mid-run (started, not unwound): none once `run`
    has returned or raised."""
    return [w.rank for w in world._workers if w.greenlet]


# ------------------------------------------------------------------------------ messages
def test_per_pair_fifo_with_varying_sizes() -> None:
    rng = random.Random(7)
    sizes = [rng.randrange(1, 200) for _ in range(40)]

    def body(comm: SimComm) -> list[float]:
        if comm.rank == 1:
            for i, n in enumerate(sizes):
                comm.send(torch.full((n,), float(i)), 0)
                comm.elapse(1e-6 * (i % 3))  # the sender's clock moves between some sends
            return []
        got: list[float] = []
        for n in sizes:
            buf = torch.empty(n)
            assert comm.recv(buf, None if len(got) % 2 else 1) == 1
            assert torch.all(buf == buf[0])
            got.append(buf[0].item())
        return got

    assert SimWorld(2, SLOW).run(body)[0] == [float(i) for i in range(len(sizes))]


def test_any_source_recv_takes_messages_in_virtual_arrival_order() -> None:
    size = 100 * 4  # bytes of 100 float32

    def body(comm: SimComm) -> list[tuple[int, float, float]]:
        if comm.rank == 0:
            out = []
            for _ in range(2):
                buf = torch.empty(100)
                src = comm.recv(buf)
                out.append((src, float(buf[0].item()), _clock(comm)))
            return out
        comm.elapse(0.002 if comm.rank == 1 else 0.001)
        comm.send(torch.full((100,), float(comm.rank)), 0)
        return []

    got = SimWorld(3, SLOW).run(body)[0]
    transfer = SLOW.latency + size / SLOW.bandwidth
    assert [(src, value) for src, value, _ in got] == [(2, 2.0), (1, 1.0)]
    # Each message arrives at its send time + latency + size / bandwidth, and recv moves the
    # receiver's clock to that arrival.
    assert got[0][2] == pytest.approx(0.001 + transfer, rel=1e-12)
    assert got[1][2] == pytest.approx(0.002 + transfer, rel=1e-12)


def test_recv_advances_the_clock_to_the_arrival_but_never_back() -> None:
    def body(comm: SimComm) -> float | None:
        if comm.rank == 1:
            comm.elapse(0.5)
            comm.send(torch.zeros(250), 0)  # 1000 bytes: 1 ms on the wire
            comm.send(torch.zeros(250), 0)
            return comm.now()
        comm.recv(torch.empty(250), 1)
        first = _clock(comm)
        comm.elapse(2.0)  # the second message arrived long ago: receiving it takes no time
        comm.recv(torch.empty(250), 1)
        assert comm.now() == pytest.approx(first + 2.0)
        return first

    first, sender_clock = SimWorld(2, SLOW).run(body)
    assert first == pytest.approx(0.5 + 1e-3 + 1e-4)
    assert sender_clock == pytest.approx(0.5)  # send is buffered: it costs the sender nothing


def test_mismatched_message_layout_is_an_error() -> None:
    def body(comm: SimComm) -> None:
        if comm.rank == 1:
            comm.send(torch.zeros(3), 0)
        else:
            comm.recv(torch.zeros(4), 1)

    with pytest.raises(WorkerFailure, match="simulated worker 0") as info:
        SimWorld(2).run(body)
    assert isinstance(info.value.__cause__, ValueError)
    assert "shape" in str(info.value.__cause__)


# --------------------------------------------------------------------------- collectives
def test_all_reduce_sums_exactly_and_synchronises_the_clocks() -> None:
    n, waits = 4, [0.1, 0.3, 0.2, 0.0]
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1000, generator=gen) for _ in range(n)]
    expected = inputs[0].clone()
    for t in inputs[1:]:
        expected.add_(t)  # rank order, as the simulator sums

    def body(comm: SimComm) -> tuple[torch.Tensor, float | None]:
        comm.elapse(waits[comm.rank])
        t = inputs[comm.rank].clone()
        comm.all_reduce_(t)
        return t, comm.now()

    world = SimWorld(n, SLOW)
    results = world.run(body)
    end = max(waits) + SLOW.allreduce_time(4000, n)
    for t, now in results:
        assert torch.equal(t, expected)
        assert now == pytest.approx(end)


def test_broadcast_copies_the_root_and_synchronises_the_clocks() -> None:
    def body(comm: SimComm) -> tuple[list[float], float | None]:
        comm.elapse(0.01 * comm.rank)
        t = torch.full((8,), float(comm.rank))
        comm.broadcast_(t, src=2)
        return t.tolist(), comm.now()

    results = SimWorld(4, SLOW).run(body)
    for values, now in results:
        assert values == [2.0] * 8
        assert now == pytest.approx(0.03 + SLOW.broadcast_time(32, 4))


def test_sub_group_collectives_leave_the_others_alone() -> None:
    def body(comm: SimComm) -> tuple[float, float]:
        odd = comm.new_group([1, 3])
        t = torch.tensor([float(comm.rank)])
        if comm.rank in odd:
            comm.all_reduce_(t, group=odd)
        return t.item(), _clock(comm)

    results = SimWorld(4, SLOW).run(body)
    assert [v for v, _ in results] == [0.0, 4.0, 2.0, 4.0]
    assert results[0][1] == 0.0 and results[1][1] > 0.0


def test_broadcast_from_outside_the_group_is_an_error() -> None:
    def body(comm: SimComm) -> None:
        comm.broadcast_(torch.zeros(1), src=3, group=comm.new_group([0, 1, 2]))

    with pytest.raises(WorkerFailure) as info:
        SimWorld(4).run(body)
    assert isinstance(info.value.__cause__, ValueError)


# ------------------------------------------------------------------------------ failures
def test_deadlock_names_every_workers_state() -> None:
    def body(comm: SimComm) -> None:
        if comm.rank == 2:
            comm.barrier(comm.new_group([2, 3]))
        elif comm.rank == 3:
            return
        else:
            comm.recv(torch.empty(1), 1 - comm.rank)

    world = SimWorld(4)
    with pytest.raises(DeadlockError) as info:
        world.run(body)
    message = str(info.value)
    assert "rank 0: blocked in recv from rank 1" in message
    assert "rank 1: blocked in recv from rank 0" in message
    assert "rank 2: blocked in barrier on group [2, 3] (1/2 arrived)" in message
    assert "rank 3: done" in message
    assert not _suspended(world)


def test_a_failing_worker_is_named_and_every_thread_unwinds() -> None:
    cleaned = []

    def body(comm: SimComm) -> None:
        try:
            if comm.rank == 2:
                comm.elapse(1.0)
                raise RuntimeError("boom")
            comm.recv(torch.empty(1), 2)
        finally:
            cleaned.append(comm.rank)
            if comm.rank == 0:
                comm.barrier()  # a verb called while the world unwinds must not hang

    world = SimWorld(3)
    with pytest.raises(WorkerFailure, match=r"simulated worker 2 failed at t=1s") as info:
        world.run(body)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert sorted(cleaned) == [0, 1, 2]
    assert not _suspended(world)


def test_a_deadlock_unwinds_workers_that_call_verbs_in_finally() -> None:
    cleaned = []

    def body(comm: SimComm) -> None:
        try:
            if comm.rank == 0:
                comm.elapse(1.0)
                return  # ranks 1 to 3 wait for a message rank 0 never sends
            comm.recv(torch.empty(1), 0)
        finally:
            if comm.rank != 0:
                cleaned.append(comm.rank)
                comm.elapse(1.0)  # verbs called while the world unwinds must not hang
                comm.send(torch.zeros(1), 0)
                comm.barrier()

    world = SimWorld(4)
    with pytest.raises(DeadlockError, match="rank 0: done at t=1s"):
        world.run(body)
    assert sorted(cleaned) == [1, 2, 3]
    assert not _suspended(world)


def test_many_worlds_end_cleanly_whatever_the_outcome() -> None:
    def body(comm: SimComm, outcome: str) -> int:
        comm.elapse(1e-3 * (comm.rank % 3))
        comm.all_reduce_(torch.ones(4))
        if outcome == "fail" and comm.rank == comm.world_size - 1:
            raise RuntimeError("boom")
        if outcome == "deadlock" and comm.rank == 0:
            comm.recv(torch.empty(1))
        return comm.rank

    for i in range(30):
        outcome = ("ok", "fail", "deadlock")[i % 3]
        world = SimWorld(1 + i % 9)
        if outcome == "ok":
            assert world.run(lambda comm: body(comm, "ok")) == list(range(world.world_size))
        else:
            with pytest.raises(WorkerFailure if outcome == "fail" else DeadlockError):
                world.run(lambda comm, o=outcome: body(comm, o))
        assert not _suspended(world)


def test_usage_errors_keep_their_type() -> None:
    def body(comm: SimComm) -> None:
        if comm.rank == 1:
            raise UsageError("lr=-1 is out of range")

    with pytest.raises(UsageError, match="lr=-1"):
        SimWorld(2).run(body)


def test_a_world_runs_once() -> None:
    world = SimWorld(2)
    assert world.run(lambda comm: comm.rank) == [0, 1]
    with pytest.raises(RuntimeError, match="runs once"):
        world.run(lambda comm: comm.rank)


def test_each_worker_keeps_its_own_grad_mode_and_communicator() -> None:
    """The workers share one thread, so what torch and distsgd keep per thread must follow each
    worker across switches, and the caller's own must be as it was afterwards."""

    def body(comm: SimComm) -> bool:
        enabled = comm.rank % 2 == 0
        with torch.set_grad_enabled(enabled):
            for i in range(3):
                comm.elapse(1e-3 * ((comm.rank + i) % 3))  # ranks interleave differently
                comm.all_reduce_(torch.ones(1))
                assert torch.is_grad_enabled() == enabled
                assert current() is comm
        return torch.is_grad_enabled()  # each worker starts with grad enabled, as a thread does

    with torch.no_grad():
        assert SimWorld(4).run(body) == [True] * 4
        assert not torch.is_grad_enabled()
    assert current() is None


# -------------------------------------------------------------------------------- replay
def _random_exchange(seed: int, n: int = 5, sends: int = 30) -> tuple[list, list[torch.Tensor]]:
    """Random sends and any-source receives with random compute; returns (trace, final state).

    Destinations come from one shared RNG, so each worker knows how many messages it will get;
    everything else (compute times, payloads, when to receive) from the worker's own RNG.
    """
    plan = random.Random(seed)
    dsts = [[plan.choice([d for d in range(n) if d != r]) for _ in range(sends)] for r in range(n)]
    trace: list[tuple[int, int, float]] = []

    def body(comm: SimComm) -> torch.Tensor:
        me = comm.rank
        rng = random.Random(seed * 1000 + me)
        gen = torch.Generator().manual_seed(seed * 1000 + me)
        expected = sum(row.count(me) for row in dsts)
        state = torch.zeros(16)
        buf = torch.empty(16)

        def take() -> None:
            nonlocal state, expected
            src = comm.recv(buf)
            trace.append((me, src, _clock(comm)))
            state = state * 0.5 + buf  # order-dependent: a different order gives other bits
            expected -= 1

        for dst in dsts[me]:
            comm.elapse(rng.expovariate(1e4))
            comm.send(torch.randn(16, generator=gen), dst)
            if expected and rng.random() < 0.4:
                take()
        while expected:
            take()
        return state

    states = SimWorld(n, NetworkModel(latency=5e-5, bandwidth=1e7)).run(body)
    return trace, states


def test_an_asynchronous_run_replays_bit_for_bit() -> None:
    trace, states = _random_exchange(seed=11)
    again_trace, again_states = _random_exchange(seed=11)
    assert trace == again_trace
    assert all(torch.equal(a, b) for a, b in zip(states, again_states, strict=True))
    assert len({src for _, src, _ in trace}) == 5  # a real any-source mix, not a fixed pattern
    other_trace, _ = _random_exchange(seed=12)
    assert other_trace != trace


def test_workers_run_in_virtual_time_order() -> None:
    """The scheduling rule itself: whatever a worker does, it does at the smallest (time, rank).

    Every step of every worker is logged as (its clock, its rank) while it runs; the log, in real
    order, must already be sorted.
    """
    n, rounds = 7, 25
    plan = random.Random(5)
    dsts = [[plan.choice([d for d in range(n) if d != r]) for _ in range(rounds)]
            for r in range(n)]
    log: list[tuple[float, int]] = []

    def body(comm: SimComm) -> None:
        me, rng = comm.rank, random.Random(100 + comm.rank)
        senders = [r for r in range(n) for d in dsts[r] if d == me]
        if me % 2:  # odd ranks take any sender's message, even ranks name the sender
            senders = [None] * len(senders)
        for dst in dsts[me]:  # sends never block, so receiving only afterwards cannot deadlock
            comm.elapse(rng.choice([0.0, 1e-4, 2e-4, rng.expovariate(1e4)]))
            log.append((_clock(comm), me))
            comm.send(torch.zeros(rng.choice([1, 100, 10_000])), dst)
            log.append((_clock(comm), me))
        for src in senders:
            comm.recv(torch.empty(0), src)
            log.append((_clock(comm), me))
            comm.elapse(rng.choice([0.0, 1e-5]))
            log.append((_clock(comm), me))

    world = SimWorld(n, NetworkModel(latency=5e-5, bandwidth=1e8))
    original = sim._copy_into
    sim._copy_into = lambda out, m, rank: None  # sizes vary: this test only cares when
    try:
        world.run(body)
    finally:
        sim._copy_into = original
    assert len(log) == n * rounds * 4
    assert log == sorted(log)
    assert len({rank for _, rank in log[:50]}) > 1  # the workers really interleave


# ------------------------------------------------------------------------------ counting
def test_byte_counters_follow_the_conventions() -> None:
    n = 4
    payload = torch.zeros(100)  # 400 bytes

    def body(comm: SimComm) -> dict[str, int]:
        comm.send(payload, (comm.rank + 1) % n)
        comm.recv(torch.empty(100))
        comm.all_reduce_(payload.clone())
        comm.broadcast_(payload.clone(), src=1)
        with comm.uncounted():  # measurement traffic is not reported
            comm.send(payload, (comm.rank + 1) % n)
            comm.recv(torch.empty(100))
            comm.all_reduce_(payload.clone())
        return comm.bytes_by_verb

    world = SimWorld(n)
    counts = world.run(body)
    size = nbytes(payload)
    for rank, by_verb in enumerate(counts):
        assert by_verb == {
            "send": size,
            "all_reduce": round(ring_allreduce_bytes(size, n)),
            "broadcast": size * tree_broadcast_children((rank - 1) % n, n),
        }
    # The same numbers written out: a ring all-reduce sends 2(n-1)/n of the tensor, and the
    # binomial tree rooted at rank 1 has rank 1 feed two children and rank 2 one.
    assert [c["all_reduce"] for c in counts] == [600] * 4
    assert [c["broadcast"] for c in counts] == [0, 800, 400, 0]
    assert world.bytes_sent() == [sum(c.values()) for c in counts]


def test_hundreds_of_workers_blocking_deep_in_their_stacks() -> None:
    """Each worker starts from `run`'s stack, not from the worker that handed it the baton:
    started one inside another, 256 workers blocking 20 frames deep exceeded Python's recursion
    limit (`distsgd project` at 128+ workers failed with RecursionError)."""

    def body(comm: SimComm) -> int:
        def deep(n: int) -> int:
            if n == 0:
                comm.elapse(1e-3)
                comm.all_reduce_(torch.ones(3))
                return comm.rank
            return deep(n - 1)

        return deep(20)

    assert SimWorld(256, NetworkModel()).run(body) == list(range(256))
