"""NetworkModel.rendezvous: point-to-point between machines as gloo moves it under TorchComm.

Two machines (ranks 0, 1 and 2, 3) joined by a 1 MB/s link with 1 ms latency; messages of 4,000
bytes (4 ms on the wire); a free path inside a machine. Expected arrival times are worked out by
hand from the model (header across, the receiver's mailbox free, "ready" back, each control
message behind at most `host_queue` of its machine's backlog; then the payload).
"""

from __future__ import annotations

import pytest
import torch

from distsgd.comm.base import Comm
from distsgd.comm.sim import Link, NetworkModel, SimWorld

pytestmark = pytest.mark.timeout(60)

MS = 1e-3


def _net(rendezvous: bool, host_queue: float = 2 * MS) -> NetworkModel:
    return NetworkModel(latency=0.0, bandwidth=1e12, hosts=(0, 0, 1, 1),
                        host_link=Link(1 * MS, 1e6), rendezvous=rendezvous,
                        host_queue=host_queue)


def _run(net: NetworkModel, sends: dict[int, list[int]]) -> dict[int, list[tuple[int, float]]]:
    """Each rank sends 4,000 bytes to each of `sends[rank]` at t = 0, then receives what is
    addressed to it (any source); returns (source, clock) per receipt."""
    expected = {r: sum(dst.count(r) for dst in sends.values()) for r in range(4)}

    def body(comm: Comm) -> list[tuple[int, float]]:
        for dst in sends.get(comm.rank, []):
            comm.send(torch.zeros(1000), dst)
        got = []
        for _ in range(expected[comm.rank]):
            src = comm.recv(torch.zeros(1000))
            got.append((src, comm.now() or 0.0))
        return got

    return dict(enumerate(SimWorld(4, net).run(body)))


def test_one_message_waits_for_the_handshake() -> None:
    # header 1 ms, ready back 1 ms, 4 ms on the wire, 1 ms latency: 7 ms (5 ms without).
    assert _run(_net(True), {0: [2]})[2] == [(0, pytest.approx(7 * MS, abs=1e-12))]
    assert _run(_net(False), {0: [2]})[2] == [(0, pytest.approx(5 * MS, abs=1e-12))]


def test_ready_queues_behind_the_reverse_backlog_up_to_host_queue() -> None:
    # 0 -> 2 goes first (rank 0 acts first): sent by 6 ms, received at 7 ms. 2 -> 0's "ready"
    # leaves machine 0 at 1 ms behind 5 ms of backlog, capped at host_queue = 2 ms: 3 + 1 ms
    # latency, then 4 ms on the wire and 1 ms latency: 9 ms.
    got = _run(_net(True), {0: [2], 2: [0]})
    assert got[2] == [(0, pytest.approx(7 * MS, abs=1e-12))]
    assert got[0] == [(2, pytest.approx(9 * MS, abs=1e-12))]
    # Uncapped, the ready waits for the whole backlog (6 ms): 7 + 4 + 1 = 12 ms.
    assert _run(_net(True, host_queue=1.0), {0: [2], 2: [0]})[0] == [
        (2, pytest.approx(12 * MS, abs=1e-12))]


def test_one_receive_at_a_time_per_rank() -> None:
    # 2 -> 0 arrives at 7 ms; 3 -> 0's header waits 2 ms (capped) behind 2's payload on
    # machine 1's NIC, but rank 0's mailbox takes it only at 7 ms: ready at 8 ms, on the wire
    # behind nothing (machine 1's NIC is free from 6 ms): 12 ms, received at 13 ms.
    got = _run(_net(True), {2: [0], 3: [0]})[0]
    assert got == [(2, pytest.approx(7 * MS, abs=1e-12)), (3, pytest.approx(13 * MS, abs=1e-12))]
    # Without the rendezvous the NICs alone serialize them: 5 ms and 9 ms.
    got = _run(_net(False), {2: [0], 3: [0]})[0]
    assert got == [(2, pytest.approx(5 * MS, abs=1e-12)), (3, pytest.approx(9 * MS, abs=1e-12))]


def test_inside_a_machine_nothing_changes() -> None:
    for rendezvous in (False, True):
        assert _run(_net(rendezvous), {0: [1]})[1] == [(0, pytest.approx(4000 / 1e12))]
