"""The simulator's transfer CPU (`NetworkModel.cpu_per_byte`): moving bytes costs a rank CPU,
free while it waits for the network, otherwise charged before its next computation."""

from __future__ import annotations

import pytest
import torch

from distsgd.comm.base import Comm
from distsgd.comm.sim import NetworkModel, SimWorld
from distsgd.comm.sim.compute import TRANSFER_CPU, transfer_cpu

SIZE = 4_000  # bytes: 1,000 float32
PER_BYTE = 1e-6  # s: 4 ms per message, easy to see next to the link's 1 ms


def net(cpu_per_byte: float) -> NetworkModel:
    return NetworkModel(latency=0.0, bandwidth=4e6, cpu_per_byte=cpu_per_byte)  # 1 ms a message


def overlapped(comm: Comm) -> float:
    """Rank 0 sends and computes 10 ms at once (as OSGP overlaps); rank 1 receives."""
    if comm.rank == 0:
        comm.send(torch.zeros(SIZE // 4), 1)
        comm.elapse(0.010)
    else:
        comm.recv(torch.zeros(SIZE // 4), src=0)
        comm.elapse(0.010)
    return float(comm.now() or 0.0)


def test_overlapped_transfer_delays_the_next_computation() -> None:
    free = SimWorld(2, net(0.0)).run(overlapped)
    charged = SimWorld(2, net(PER_BYTE)).run(overlapped)
    assert free == pytest.approx([0.010, 0.011])
    # The sender owes 4 ms, paid before its computation; the receiver waited 1 ms for the message
    # while its 4 ms were being spent, so 3 ms are left for its computation.
    assert charged == pytest.approx([0.014, 0.014])


def waiting(comm: Comm) -> float:
    """A round trip of 1 ms each way with 10 ms of the peer's compute in between: rank 0 waits
    12 ms for the reply, more than its 8 ms of transfer CPU."""
    if comm.rank == 0:
        comm.send(torch.zeros(SIZE // 4), 1)
        comm.recv(torch.zeros(SIZE // 4), src=1)
        comm.elapse(0.0)
    else:
        comm.recv(torch.zeros(SIZE // 4), src=0)
        comm.elapse(0.010)
        comm.send(torch.zeros(SIZE // 4), 0)
    return float(comm.now() or 0.0)


def test_waiting_for_the_network_absorbs_the_transfer_cpu() -> None:
    free = SimWorld(2, net(0.0)).run(waiting)
    charged = SimWorld(2, net(PER_BYTE)).run(waiting)
    assert free[0] == pytest.approx(0.012)
    assert charged[0] == pytest.approx(free[0] + 0.003)  # rank 1 replies 3 ms later (see above)


def test_collectives_absorb_it_and_replay_bit_for_bit() -> None:
    def body(comm: Comm) -> float:
        comm.elapse(0.001 * comm.rank)  # rank 0 arrives first and waits longest
        comm.all_reduce_(torch.ones(SIZE // 4))
        comm.elapse(0.0)
        return float(comm.now() or 0.0)

    first = SimWorld(4, net(PER_BYTE)).run(body)
    assert first == SimWorld(4, net(PER_BYTE)).run(body)
    assert first[0] < first[3]  # the rank that waited paid less of its transfer CPU after


def test_transfer_cpu_is_charged_only_where_cores_are_shared() -> None:
    assert transfer_cpu(4, 0) == 0.0  # a core each (the default): a spare core moves the bytes
    assert transfer_cpu(4, 2) == pytest.approx(2 * TRANSFER_CPU)
    assert transfer_cpu(4, 4) == pytest.approx(TRANSFER_CPU)  # no core to spare
    assert transfer_cpu(2, 4) == 0.0  # spare cores
