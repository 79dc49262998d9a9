"""The point-to-point transport: concurrent senders, posted-ahead receives (`exchange`, and
`exchange_start`'s handles), a stalled sender that blocks nobody else, timeouts that name the rank
that did not send.

Starting processes is the slow part, so one launch of 4 processes runs every healthy scenario
(`healthy`) and the simulator runs the same, for the results to be compared; the two runs that
must fail (a timeout) have a launch each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from distsgd.comm.base import Comm
from distsgd.comm.sim import SimWorld
from distsgd.errors import CommTimeout, DeadlockError, ProtocolError, WorkerFailure
from distsgd.launch import launch

pytestmark = pytest.mark.timeout(300)

N = 4
BIG = 100_000  # floats per message: large enough that gloo sends it in many pieces


def _taken(comm: Comm) -> None:
    """On processes, wait until every message this rank sent has been taken by its receiver
    (gloo completes a send only then); the simulator's sends are buffered."""
    outbox = getattr(comm, "_outbox", None)
    if outbox is not None:
        assert outbox.wait_empty(30.0), "a message was never taken"


def into_one(comm: Comm, by_exchange: bool) -> Any:
    """Ranks 3, 2, 1 send BIG floats into rank 0, in that order, each only once the previous
    sender's message was taken; rank 0 receives in the order 1, 2, 3. So this completes only if
    rank 0's receives do not wait for each other (posted at once, or taken as they come)."""
    if comm.rank == 0:
        outs = [torch.empty(BIG) for _ in range(1, N)]
        if by_exchange:
            comm.exchange([], [(o, src) for src, o in enumerate(outs, start=1)])
        else:
            for src, o in enumerate(outs, start=1):
                comm.recv(o, src)
        return [(o[0].item(), o[-1].item(), o.double().sum().item()) for o in outs]
    if comm.rank < N - 1:
        comm.recv(torch.empty(1), comm.rank + 1)  # the next rank's message was taken: go
    message = torch.arange(BIG, dtype=torch.float32) + 1000 * comm.rank
    if by_exchange:
        comm.exchange([(message, 0)], [])
    else:
        comm.send(message, 0)
    _taken(comm)
    if comm.rank > 1:
        comm.send(torch.ones(1), comm.rank - 1)
    return None


def push_sum_both_ways(comm: Comm) -> Any:
    """Three push-sum steps (to rank+1 and rank+2), once by exchange and once by send/recv:
    the same bits."""
    results = []
    for by_exchange in (True, False):
        x = torch.randn(1000, generator=torch.Generator().manual_seed(comm.rank),
                        dtype=torch.float64)
        for _ in range(3):
            share = x / 3
            outs = [torch.empty_like(x) for _ in range(2)]
            peers = [(comm.rank + k) % N for k in (1, 2)]
            sources = [(comm.rank - k) % N for k in (1, 2)]
            if by_exchange:
                comm.exchange([(share, p) for p in peers], list(zip(outs, sources, strict=True)))
            else:
                for p in peers:
                    comm.send(share, p)
                for o, s in zip(outs, sources, strict=True):
                    comm.recv(o, s)
            x = share.clone()
            for o in outs:
                x.add_(o)
        results.append(x)
    assert torch.equal(results[0], results[1])
    return results[0].tolist()


def stalled_sender(comm: Comm) -> Any:
    """Rank 3 sends rank 0 a header and holds its payload back; ranks 1 and 2 then send. Rank 0
    receives theirs at once, and a receive from rank 3 times out naming rank 3. Processes only:
    it forges the stall through the outbox."""
    import torch.distributed as dist

    from distsgd.comm.torch import wire

    payload = torch.full((BIG,), 3.0)
    if comm.rank == 3:
        comm._outbox.post(wire.header(wire.DATA, payload), None, 0)  # type: ignore[attr-defined]
    comm.barrier()
    if comm.rank in (1, 2):
        comm.send(torch.full((BIG,), float(comm.rank)), 0)
    result: Any = None
    if comm.rank == 0:
        time.sleep(0.5)  # rank 3's header is in by now
        buf = torch.empty(BIG)
        start = time.monotonic()
        got = sorted(comm.recv(buf, timeout=20.0) for _ in range(2))
        took = time.monotonic() - start
        try:
            comm.recv(buf, 3, timeout=1.0)
            message = "no timeout"
        except CommTimeout as e:
            message = str(e)
        result = [got, took, message]
    comm.barrier()
    if comm.rank == 3:  # the payload at last: the stream from rank 3 carries on intact
        work = dist.isend(payload.view(torch.uint8), 0, tag=wire.PAYLOAD_TAG)
        assert work is not None
        work.wait()
    if comm.rank == 0:
        comm.recv(buf, 3, timeout=20.0)
        result.append(buf.unique().tolist())
    return result


def layout_mismatch(comm: Comm) -> Any:
    """Rank 1 exchanges 3 floats where rank 0 expects 4: rank 0's exchange raises naming rank 1
    (a ProtocolError, a ValueError; on processes the communicator then refuses work)."""
    if comm.rank == 1:
        comm.exchange([(torch.zeros(3), 0)], [])
    if comm.rank != 0:
        return None
    try:
        comm.exchange([], [(torch.empty(4), 1)])
        return "no error"
    except ValueError as e:
        error = (type(e).__name__, str(e))
    try:
        comm.poll(torch.empty(1))
        return error, "not refused"
    except CommTimeout as e:
        return error, str(e)


def started_rounds(comm: Comm) -> Any:
    """exchange_start: three rounds to rank+1 and rank+2 started before any is waited for, a plain
    exchange between them on the same channel, waited in reverse order: the k-th message from a
    peer fills the k-th receive from it. Sends are copied at once; a handle waited once returns
    the same at once; bytes count as send."""
    before = comm.bytes_by_verb.get("send", 0)
    me = comm.rank
    peers, sources = [(me + k) % N for k in (1, 2)], [(me - k) % N for k in (1, 2)]
    handles, outs = [], []
    mid = [torch.empty(2) for _ in sources]
    for r in range(3):
        if r == 1:
            comm.exchange([(torch.full((2,), 100.0 + me), p) for p in peers],
                          list(zip(mid, sources, strict=True)))
        into = [torch.empty(5, dtype=torch.float64) for _ in sources]
        message = torch.full((5,), 10.0 * me + r, dtype=torch.float64)
        handles.append(comm.exchange_start([(message, p) for p in peers],
                                           list(zip(into, sources, strict=True))))
        message.zero_()
        outs.append(into)
    assert all(h.unsent == frozenset() for h in handles)
    assert [h.wait() for h in reversed(handles)] == [(frozenset(), frozenset())] * 3
    assert handles[0].done() and handles[0].wait() == (frozenset(), frozenset())
    return ([[o.tolist() for o in into] for into in outs], [m.tolist() for m in mid],
            comm.bytes_by_verb.get("send", 0) - before)


def started_done(comm: Comm) -> Any:
    """done() never blocks: False while rank 1 holds its message back, True once it is in (the
    simulator: once it has arrived by rank 0's clock)."""
    comm.barrier()
    if comm.rank == 1:
        comm.barrier()
        assert comm.exchange_start([(torch.full((3,), 7.0), 0)], []).unsent == frozenset()
    elif comm.rank == 0:
        box = torch.zeros(3)
        handle = comm.exchange_start([], [(box, 1)])
        early = handle.done()
        comm.barrier()  # rank 1 sends after this
        comm.barrier()
        for _ in range(2000):  # up to 20 s (the simulator: 2 virtual seconds)
            if handle.done():
                break
            if comm.now() is None:
                time.sleep(0.01)
            else:
                comm.elapse(1e-3)
        late = handle.done()
        return early, late, handle.wait(timeout=1.0), box.tolist()
    else:
        comm.barrier()
    comm.barrier()
    return None


def started_usage(comm: Comm) -> Any:
    """Bad exchange_start arguments are ValueErrors before anything is sent or posted."""
    errors = []
    one = torch.zeros(1)
    for sends, recvs in (([(one, comm.rank)], []), ([], [(one, None)]), ([(one, N)], []),
                         ([(one, True)], [])):
        try:
            comm.exchange_start(sends, recvs)  # type: ignore[arg-type]
            errors.append("none")
        except ValueError as e:
            errors.append(str(e))
    return errors


def late_sender(comm: Comm) -> Any:
    """Processes only, after `layout_mismatch` (rank 0 is out): rank 1 starts receives from
    ranks 2 and 3; rank 3 sends at once, rank 2 three seconds later. Rank 3's is waited for at
    once; rank 2's wait times out after 1 s naming rank 2 alone, and rank 1's communicator then
    refuses work. Rank 2's message still lands in the posted receive, so every rank ends."""
    if comm.rank == 1:
        from_2, from_3 = torch.empty(BIG), torch.empty(10)
        h2 = comm.exchange_start([], [(from_2, 2)])
        h3 = comm.exchange_start([], [(from_3, 3)])
        start = time.monotonic()
        h3.wait(timeout=20.0)
        took = time.monotonic() - start
        try:
            h2.wait(timeout=1.0)
            message = "no timeout"
        except CommTimeout as e:
            message = str(e)
        with pytest.raises(CommTimeout) as refused:
            comm.exchange_start([], [])
        return took, from_3.unique().tolist(), message, str(refused.value)
    if comm.rank == 3:
        comm.exchange_start([(torch.full((10,), 3.0), 1)], [])
    if comm.rank == 2:
        time.sleep(3.0)
        comm.exchange_start([(torch.zeros(BIG), 1)], [])
    return None


def healthy(comm: Comm, processes: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs: dict[str, Callable[[], Any]] = {
        "exchange into one": lambda: into_one(comm, True),
        "mailbox into one": lambda: into_one(comm, False),
        "push-sum": lambda: push_sum_both_ways(comm),
        "started rounds": lambda: started_rounds(comm),
        "started done": lambda: started_done(comm),
        "started usage": lambda: started_usage(comm),
        "stalled": lambda: stalled_sender(comm) if processes else None}
    for name, run in runs.items():
        comm.barrier()
        out[name] = run()
    comm.barrier()
    out["layout"] = layout_mismatch(comm)  # it breaks rank 0's communicator
    out["late"] = late_sender(comm) if processes else None  # last: it breaks rank 1's
    return out


@pytest.fixture(scope="module")
def process_results() -> list[dict[str, Any]]:
    return launch(healthy, N, args=(True,), timeout=240, comm_timeout=60)


@pytest.fixture(scope="module")
def sim_results() -> list[dict[str, Any]]:
    return SimWorld(N).run(lambda comm: healthy(comm, False))


@pytest.mark.parametrize("name", ["exchange into one", "mailbox into one", "push-sum"])
def test_the_simulator_runs_the_transport_scenarios(name: str,
                                                    sim_results: list[dict[str, Any]]) -> None:
    expected = [(1000.0 * r, 1000.0 * r + BIG - 1, float(sum(range(BIG))) + 1000.0 * r * BIG)
                for r in range(1, N)]
    if name == "push-sum":  # (it compared exchange with send/recv bit for bit)
        assert all(len(r[name]) == 1000 for r in sim_results)
    else:
        assert [tuple(t) for t in sim_results[0][name]] == expected


@pytest.mark.processes
@pytest.mark.parametrize("name", ["exchange into one", "mailbox into one", "push-sum"])
def test_concurrent_senders_into_one_receiver_agree_with_the_simulator(
    name: str, process_results: list[dict[str, Any]], sim_results: list[dict[str, Any]],
) -> None:
    # Ranks 3, 2, 1 sent one after another while rank 0 received in the order 1, 2, 3.
    assert [r[name] for r in process_results] == [r[name] for r in sim_results]


STARTED = ["started rounds", "started done", "started usage"]


def test_exchange_start_in_the_simulator(sim_results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(sim_results):
        rounds, mid, sent = r["started rounds"]
        assert rounds == [[[10.0 * ((rank - k) % N) + i] * 5 for k in (1, 2)] for i in range(3)]
        assert mid == [[100.0 + (rank - k) % N] * 2 for k in (1, 2)]
        assert sent == 3 * 2 * 40 + 2 * 8  # three rounds and the exchange, to two peers
        assert len(r["started usage"]) == 4
        assert all("is not another rank" in e for e in r["started usage"]), r["started usage"]
    assert sim_results[0]["started done"] == (False, True, (frozenset(), frozenset()), [7.0] * 3)


@pytest.mark.processes
@pytest.mark.parametrize("name", STARTED)
def test_exchange_start_on_processes_agrees_with_the_simulator(
    name: str, process_results: list[dict[str, Any]], sim_results: list[dict[str, Any]],
) -> None:
    assert [r[name] for r in process_results] == [r[name] for r in sim_results]


@pytest.mark.processes
def test_a_late_started_sender_is_named_and_blocks_nobody_else(
        process_results: list[dict[str, Any]]) -> None:
    took, from_3, message, refused = process_results[1]["late"]
    assert took < 15.0 and from_3 == [3.0]  # rank 3's message did not wait for rank 2's
    assert "rank 1: exchange timed out after 1 s waiting for rank(s) [2]" in message, message
    assert "exchange_start refused" in refused, refused


def test_the_simulator_finds_a_silent_started_peer_deadlocked() -> None:
    def body(comm: Comm) -> None:
        if comm.rank == 0:
            comm.exchange_start([], [(torch.empty(3), 1), (torch.empty(3), 2)]).wait()
        elif comm.rank == 1:
            comm.exchange_start([(torch.zeros(3), 0)], [])
    with pytest.raises(DeadlockError, match="rank 0: blocked in recv from rank 2"):
        SimWorld(3).run(body)


@pytest.mark.processes
def test_a_stalled_sender_does_not_block_the_others(process_results: list[dict[str, Any]]) -> None:
    got, took, message = process_results[0]["stalled"][:3]
    assert got == [1, 2]
    assert took < 15.0  # not the 20 s timeout: the stalled payload held up nobody else
    assert "rank 0: recv from rank 3 timed out after 1 s" in message, message
    assert "rank(s) [3] sent a header but not its payload" in message, message
    assert process_results[0]["stalled"][3] == [3.0]


@pytest.mark.processes
def test_an_exchange_of_another_layout_names_the_sender(process_results: list[dict[str, Any]],
                                                         sim_results: list[dict[str, Any]]) -> None:
    (kind, message), refused = process_results[0]["layout"]
    assert kind == ProtocolError.__name__
    assert ("rank 0 received a torch.float32 tensor of shape (3,) from rank 1 into a "
            "torch.float32 buffer of shape (4,)") in message
    assert "poll refused" in refused
    _, sim_message = sim_results[0]["layout"][0]
    assert "from rank 1" in sim_message and "layout" in sim_message


def silent_peer(comm: Comm) -> None:
    """Rank 1 exchanges with rank 0; rank 2, alive, sends nothing."""
    if comm.rank == 0:
        comm.exchange([], [(torch.empty(BIG), 1), (torch.empty(10), 2)], timeout=4.0)
    elif comm.rank == 1:
        comm.exchange([(torch.zeros(BIG), 0)], [])
    comm.barrier()


@pytest.mark.processes
def test_an_exchange_timeout_names_the_rank_that_did_not_send() -> None:
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"worker 0 failed: .*CommTimeout: rank 0: exchange "
                                            r"timed out after 4 s waiting for rank\(s\) \[2\]"):
        launch(silent_peer, 3, timeout=120, comm_timeout=60)
    assert time.monotonic() - start < 60  # the exchange's timeout, not the communicator's


def test_the_simulator_finds_a_silent_peer_deadlocked() -> None:
    with pytest.raises(DeadlockError, match="rank 0: blocked in recv from rank 2"):
        SimWorld(3).run(silent_peer)


def announce_without_sending(comm: Comm) -> None:
    """Rank 1 sends rank 0 two headers of 1.2 GB payloads each and neither payload."""
    from distsgd.comm.torch import wire

    if comm.rank == 1:
        for _ in range(2):
            header = wire.header(wire.DATA, torch.empty(0))
            header[5] = 300_000_000  # float32 of shape (300 M,): each alone within the limit
            comm._outbox.post(header, None, 0)  # type: ignore[attr-defined]
        comm.barrier()  # rank 0 fails first
    else:
        comm.recv(torch.empty(1), 1, timeout=30.0)


@pytest.mark.processes
def test_headers_may_not_announce_more_unsent_payload_than_the_limit() -> None:
    # The mailbox no longer waits for a payload after its header, so a sender could otherwise
    # make it allocate without bound, header after header.
    with pytest.raises(WorkerFailure, match=r"worker 0 failed: .*ProtocolError: rank 0 rejected "
                                            r"a message from rank 1: it announced more than "
                                            r"2147483648 bytes of payloads that it has not sent"):
        launch(announce_without_sending, 2, timeout=120, comm_timeout=60)
