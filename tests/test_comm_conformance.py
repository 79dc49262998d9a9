"""One suite, both backends: the `Comm` semantics of distsgd.comm.base, checked on the simulator
and on real gloo processes, with the results compared scenario by scenario.

Each scenario is a module-level function ``scenario(comm) -> result`` (module level so that the
launcher can pickle it). Starting processes is the slow part (about a second per process on two
cores), so one launch of 4 processes runs every healthy scenario in turn, separated by barriers,
and one SimWorld runs the same harness; the tests then compare results and byte counts.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from distsgd.comm.base import Comm, nbytes, ring_allreduce_bytes, tree_broadcast_children
from distsgd.comm.sim import SimWorld
from distsgd.errors import CommTimeout, DeadlockError, UsageError, WorkerFailure
from distsgd.launch import launch

pytestmark = pytest.mark.timeout(180)

N = 4


# ------------------------------------------------------------------------------- scenarios
def p2p_fifo(comm: Comm) -> Any:
    """Many messages of varying sizes from one sender arrive in send order (two pairs at once)."""
    rng = random.Random(5)
    sizes = [rng.randrange(1, 300) for _ in range(25)]
    pairs = {1: (0, torch.float32), 2: (3, torch.float64)}
    if comm.rank in pairs:
        dst, dtype = pairs[comm.rank]
        for i, n in enumerate(sizes):
            comm.send(torch.full((n,), float(i), dtype=dtype), dst)
        return None
    src, dtype = {0: (1, torch.float32), 3: (2, torch.float64)}[comm.rank]
    got = []
    for i, n in enumerate(sizes):
        buf = torch.empty(n, dtype=dtype)
        assert comm.recv(buf, src if i % 2 else None) == src
        got.append(buf.unique().tolist())
    return got


def any_source_sender(comm: Comm) -> Any:
    """An any-source recv returns the rank that sent the message it filled in."""
    if comm.rank:
        comm.send(torch.full((3,), float(comm.rank)), 0)
        return None
    got = []
    for _ in range(N - 1):
        buf = torch.empty(3)
        src = comm.recv(buf)
        assert buf.tolist() == [float(src)] * 3
        got.append(src)
    return sorted(got)  # arrival order across senders is not specified


def specific_source_first(comm: Comm) -> Any:
    """recv(src=3) takes rank 3's messages, in order, even when others arrived first."""
    if comm.rank:
        for i in range(2):
            comm.send(torch.tensor([10.0 * comm.rank + i]), 0)
        return None
    buf = torch.empty(1)
    first = [(comm.recv(buf, 3), buf.item()) for _ in range(2)]
    rest = sorted((comm.recv(buf), buf.item()) for _ in range(2 * (N - 2)))
    return first, rest


def send_copies_payload(comm: Comm) -> Any:
    """Changing a tensor right after sending it does not change what arrives."""
    if comm.rank == 0:
        t = torch.arange(4.0)
        comm.send(t, 1)
        t.fill_(-1.0)
        comm.send(t, 1)
        t.add_(100.0)
        return None
    if comm.rank == 1:
        a, b = torch.empty(4), torch.empty(4)
        comm.recv(a, 0)
        comm.recv(b, 0)
        return a.tolist(), b.tolist()
    return None


def special_tensors(comm: Comm) -> Any:
    """0-d, empty, bool, int and complex tensors, and a non-contiguous one, travel intact."""
    tensors = [torch.tensor(3.5), torch.empty(0), torch.tensor([True, False, True]),
               torch.arange(6, dtype=torch.int64).reshape(2, 3),
               torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
               torch.arange(12.0).reshape(3, 4).t()]
    if comm.rank == 2:
        for t in tensors:
            comm.send(t, 1)
        return None
    if comm.rank == 1:
        out = []
        for t in tensors:
            buf = torch.empty(t.shape, dtype=t.dtype)
            comm.recv(buf, 2)
            assert torch.equal(buf, t)
            out.append(str(buf.dtype))
        return out
    return None


def layout_mismatch(comm: Comm) -> Any:
    """Receiving into a buffer of another shape or dtype is a ValueError (and takes the message)."""
    if comm.rank == 1:
        comm.send(torch.zeros(3), 0)
        comm.send(torch.zeros(2, dtype=torch.float64), 0)
        comm.send(torch.ones(5), 0)
        return None
    if comm.rank == 0:
        errors = []
        for buf in (torch.empty(4), torch.empty(2)):
            try:
                comm.recv(buf, 1)
            except ValueError as e:
                errors.append("layout" in str(e))
        buf = torch.empty(5)
        comm.recv(buf, 1)
        return errors, buf.tolist()
    return None


def all_reduce(comm: Comm) -> Any:
    """Sums on every rank; integer-valued floats make the sum exact in any summation order."""
    f = torch.arange(6.0) * (comm.rank + 1)
    i = torch.arange(4, dtype=torch.int64) + 10 * comm.rank
    strided = (torch.arange(6.0).reshape(2, 3) + comm.rank).t()  # not contiguous
    for t in (f, i, strided):
        assert comm.all_reduce_(t) is t
    return f.tolist(), i.tolist(), strided.tolist()


def broadcast(comm: Comm) -> Any:
    a = torch.full((5,), float(comm.rank))
    b = (torch.arange(6.0).reshape(2, 3) * (comm.rank + 1)).t()
    comm.broadcast_(a, src=2)
    comm.broadcast_(b, src=1)
    return a.tolist(), b.tolist()


def sub_groups(comm: Comm) -> Any:
    """new_group on every rank, members or not; collectives run within the group only."""
    odd = comm.new_group([1, 3])
    first = comm.new_group([0, 1, 2])
    t = torch.tensor([float(comm.rank + 1)])
    u = torch.tensor([float(comm.rank)])
    if comm.rank in odd:
        comm.all_reduce_(t, group=odd)
        comm.barrier(group=odd)
    if comm.rank in first:
        comm.broadcast_(u, src=1, group=first)
        comm.all_reduce_(u, group=first)
    return t.item(), u.item(), odd.ranks, first.size


def uncounted(comm: Comm) -> Any:
    """Traffic inside uncounted() is not reported; traffic outside is."""
    before = comm.bytes_by_verb
    with comm.uncounted():
        comm.send(torch.zeros(10), (comm.rank + 1) % N)
        comm.recv(torch.empty(10), (comm.rank - 1) % N)
        comm.all_reduce_(torch.zeros(10))
        comm.broadcast_(torch.zeros(10), src=0)
    inside = comm.bytes_by_verb
    comm.send(torch.zeros(10), (comm.rank + 1) % N)
    comm.recv(torch.empty(10), (comm.rank - 1) % N)
    return inside == before, comm.bytes_by_verb["send"] - before.get("send", 0)


def poll(comm: Comm) -> Any:
    """poll takes a message that has arrived, and returns None (at once) when there is none."""
    buf = torch.empty(2)
    nothing = comm.poll(buf)
    # Every rank has polled before rank 1 sends: on processes, a rank 0 that reached its first
    # poll late would otherwise take the message there (a race of the test, not of poll).
    comm.barrier()
    if comm.rank == 1:
        comm.send(torch.tensor([7.0, 8.0]), 0)
    if comm.rank != 0:
        return nothing, None
    # Until the message is there: a bounded number of virtual steps in the simulator, a real-time
    # deadline on processes (a loaded 2-core machine can delay the sender by seconds).
    deadline = time.monotonic() + 60
    for _ in range(10_000_000):
        src = comm.poll(buf, 1)
        if src is not None:
            return nothing, (src, buf.tolist())
        comm.elapse(1e-5)
        if comm.now() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(1e-3)
        elif _ > 10_000:
            break
    raise AssertionError("the message never arrived")


def usage_checks(comm: Comm) -> Any:
    """Bad arguments are ValueErrors on both backends."""
    errors: list[str | None] = []
    for call in (lambda: comm.send(torch.zeros(1), comm.rank), lambda: comm.send(torch.zeros(1), N),
                 lambda: comm.recv(torch.zeros(1), -1), lambda: comm.elapse(-1.0),
                 lambda: comm.new_group([0, 0]),
                 lambda: comm.broadcast_(torch.zeros(1), src=N)):
        try:
            call()
            errors.append(None)
        except ValueError:
            errors.append("ValueError")
    return isinstance(comm, Comm), comm.rank, comm.world_size, errors


def supervision(comm: Comm) -> Any:
    """Steps are noted without a message or a byte (the launcher records them on processes),
    and in a healthy run nobody has died: deaths() is empty on both backends."""
    for step in range(3):
        comm.note_step(step)
    return comm.deaths()


def exchange_rounds(comm: Comm) -> Any:
    """exchange: every rank sends to its two successors and receives from its two predecessors,
    messages of every kind (0-d, empty, bool, complex, a non-contiguous send and receive), over
    several rounds; what each sends is changed at once (sends are copied)."""
    got = []
    for step in range(4):
        me = comm.rank
        tensors = [torch.full((50 + step,), 10.0 * me + step), torch.tensor(me + 0.5),
                   torch.empty(0), torch.tensor([me % 2 == 0, True]),
                   torch.tensor([me + 1j], dtype=torch.complex64),
                   torch.arange(12.0).reshape(3, 4).t() + me]
        sends = [(t, (me + k) % N) for k in (1, 2) for t in tensors]
        outs = [torch.empty(t.shape, dtype=t.dtype) for _ in (1, 2) for t in tensors]
        outs[-1] = torch.empty(3, 4).t()  # a non-contiguous receive
        recvs = [(o, (me - 1 - i // len(tensors)) % N) for i, o in enumerate(outs)]
        assert comm.exchange(sends, recvs) == (frozenset(), frozenset())
        for t in tensors:
            t.zero_()
        got.append([o.tolist() for o in outs])
    return got


def exchange_beside_mailbox(comm: Comm) -> Any:
    """exchange's messages and send/recv's do not mix: each is received by its own verb, in
    order, whichever was sent first; an empty exchange does nothing."""
    assert comm.exchange([], []) == (frozenset(), frozenset())
    if comm.rank == 1:
        comm.send(torch.tensor([1.0]), 0)
        comm.exchange([(torch.tensor([2.0]), 0), (torch.tensor([3.0, 3.0]), 0)], [])
        comm.send(torch.tensor([4.0]), 0)
        return None
    if comm.rank == 0:
        a, b, c, d = torch.empty(1), torch.empty(1), torch.empty(2), torch.empty(1)
        comm.recv(a, 1)
        comm.exchange([], [(b, 1), (c, 1)])
        comm.recv(d, 1)
        return [a.tolist(), b.tolist(), c.tolist(), d.tolist()]
    return None


def exchange_usage(comm: Comm) -> Any:
    """Bad exchange arguments are ValueErrors before anything is sent, on both backends."""
    errors = []
    one = torch.zeros(1)
    for sends, recvs in (([(one, comm.rank)], []), ([], [(one, None)]), ([(one, N)], []),
                         ([(one, 1, 2)], []), ([], [(one, -1)]), ([(one, True)], [])):
        try:
            comm.exchange(sends, recvs)  # type: ignore[arg-type]
            errors.append("none")
        except ValueError as e:
            errors.append(str(e))
    return errors


SCENARIOS: dict[str, Callable[[Comm], Any]] = {f.__name__: f for f in (
    p2p_fifo, any_source_sender, specific_source_first, send_copies_payload, special_tensors,
    layout_mismatch, all_reduce, broadcast, sub_groups, uncounted, poll, usage_checks,
    supervision, exchange_rounds, exchange_beside_mailbox, exchange_usage)}


def run_all(comm: Comm) -> dict[str, Any]:
    """Every scenario in turn on this rank: (result or error, bytes it sent, per verb)."""
    out: dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        comm.barrier()
        before = comm.bytes_by_verb
        try:
            result: Any = ("ok", scenario(comm))
        except Exception as e:  # reported by the test that compares this scenario
            result = ("error", f"{type(e).__name__}: {e}")
        after = comm.bytes_by_verb
        sent = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        out[name] = (result, sent)
    comm.barrier()
    # A message nobody receives: dropped at the end (`TorchComm.close`), as the simulator does.
    comm.send(torch.ones(3), (comm.rank + 1) % comm.world_size)
    return out


@pytest.fixture(scope="module")
def sim_results() -> list[dict[str, Any]]:
    return SimWorld(N).run(run_all)


@pytest.fixture(scope="module")
def process_results() -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a worker that crashed after returning its result
        return launch(run_all, N, timeout=150, comm_timeout=30)


@pytest.mark.processes
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_both_backends_agree(name: str, sim_results: list, process_results: list) -> None:
    sim = [r[name][0] for r in sim_results]
    real = [r[name][0] for r in process_results]
    assert all(kind == "ok" for kind, _ in sim), sim
    assert real == sim


@pytest.mark.processes
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_both_backends_count_the_same_bytes(name: str, sim_results: list,
                                            process_results: list) -> None:
    assert [r[name][1] for r in process_results] == [r[name][1] for r in sim_results]


def test_byte_counts_follow_the_conventions(sim_results: list) -> None:
    # The test above shows that the processes count alike; this pins what both count.
    assert [r["all_reduce"][1]["all_reduce"] for r in sim_results] == [
        round(2 * ring_allreduce_bytes(24, N) + ring_allreduce_bytes(32, N))] * N
    # broadcast: 20 bytes from rank 2, then 24 bytes from rank 1, once per child in the tree.
    assert [r["broadcast"][1].get("broadcast", 0) for r in sim_results] == [
        20 * tree_broadcast_children((rank - 2) % N, N)
        + 24 * tree_broadcast_children((rank - 1) % N, N) for rank in range(N)] == [0, 48, 64, 20]
    rng = random.Random(5)
    assert sim_results[1]["p2p_fifo"][1] == {"send": sum(4 * rng.randrange(1, 300)
                                                         for _ in range(25))}
    assert sim_results[0]["uncounted"][0] == ("ok", (True, nbytes(torch.zeros(10))))
    # exchange counts as send: every byte it sends, once
    assert sim_results[1]["exchange_beside_mailbox"][1] == {"send": 4 * 5}


def test_the_simulator_has_no_reports_channel_its_ranks_observe_instead() -> None:
    def body(comm: Comm) -> Any:
        comm.expose("x", lambda: comm.rank * 10)
        comm.barrier()
        with pytest.raises(UsageError, match="no reports channel; read other ranks' state with "
                                             r"observe\(rank, key\)"):
            comm.send_report(torch.zeros(1), 1 - comm.rank)
        with pytest.raises(UsageError, match="no reports channel"):
            comm.recv_report(torch.zeros(1), 1 - comm.rank)
        return comm.observe(1 - comm.rank, "x")

    assert SimWorld(2).run(body) == [10, 0]


# --------------------------------------------------------------------------- timeouts
def recv_nobody(comm: Comm) -> None:
    if comm.rank == 0:
        comm.recv(torch.empty(1), 1)


@pytest.mark.processes
def test_processes_report_a_receive_from_a_closed_rank_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"worker 0 failed.*rank 1 has closed"):
        launch(recv_nobody, 2, timeout=60, comm_timeout=30)
    assert time.monotonic() - start < 25  # it did not wait for the 30 s timeout


def timeouts(comm: Comm) -> Any:
    """Rank 1 stays alive but sends nothing until rank 0 has timed out twice."""
    if comm.rank == 1:
        comm.barrier()  # up to the communicator's 5 s; rank 0 comes after its two 1 s timeouts
        comm.send(torch.tensor([42.0]), 0)
        return None
    out: dict[str, Any] = {}
    buf = torch.empty(1)
    for key, src in (("recv", 1), ("recv_any", None)):
        start = time.monotonic()
        try:
            comm.recv(buf, src, timeout=1.0)
        except CommTimeout as e:
            out[key] = (time.monotonic() - start, str(e))
    comm.barrier()
    comm.recv(buf, 1)  # a recv timeout leaves the communicator usable
    out["after"] = buf.item()
    start = time.monotonic()
    try:
        comm.all_reduce_(torch.zeros(1), timeout=1.0)  # rank 1 never joins
    except CommTimeout as e:
        out["all_reduce"] = (time.monotonic() - start, str(e))
    try:
        comm.barrier()
    except CommTimeout as e:  # gloo may still run the all-reduce: the communicator refuses
        out["refused"] = str(e)
    return out


@pytest.mark.processes
def test_processes_time_out_with_a_clear_error() -> None:
    out = launch(timeouts, 2, timeout=90, comm_timeout=5.0)[0]
    for key in ("recv", "recv_any", "all_reduce"):
        seconds, message = out[key]
        assert 0.9 <= seconds < 3.0, (key, seconds)
        assert "rank 0" in message and "timed out after 1 s" in message
    assert "from rank 1" in out["recv"][1] and "from any rank" in out["recv_any"][1]
    assert out["after"] == 42.0
    assert "refused" in out["refused"]


@pytest.mark.parametrize("scenario", [recv_nobody, timeouts])
def test_the_simulator_finds_the_same_scenarios_deadlocked(scenario: Callable) -> None:
    # Where processes time out or see their peer close, every simulated worker is blocked.
    with pytest.raises(DeadlockError, match="rank 0: blocked in recv from rank 1"):
        SimWorld(2).run(scenario)
