"""The simulator's receiving ports are work-conserving (network.Port): a message reserved later in
time does not hold back one whose bytes reach the port earlier (issue 11, crossover on 4x1)."""

from __future__ import annotations

import pytest
import torch

from distsgd import topology
from distsgd.comm.base import Comm
from distsgd.comm.sim import Link, NetworkModel, SimWorld
from distsgd.comm.sim.network import Port

BANDWIDTH = 100e6 / 8  # 100 Mbit/s between machines
SEGMENTS = (33_000, 263_000, 5_000)  # float32 parameters: the wide MLP's unequal blocks
STEPS = 10


def test_a_port_serves_early_bytes_in_the_idle_time_before_a_later_reservation() -> None:
    port = Port()
    assert port.take(10.0, 1.0) == 11.0  # reserved first, for later
    assert port.take(0.0, 2.0) == 2.0  # arrives earlier: served before it, not behind it
    assert port.take(1.5, 9.0) == 12.0  # fills 2..10, waits out 10..11, then 11..12
    assert port.busy == [(0.0, 12.0)] and port.free == 12.0


def _crossover_exchange(comm: Comm) -> None:
    n, me = comm.world_size, comm.rank
    x = [torch.zeros(size) for size in SEGMENTS]
    for step in range(STEPS):
        plans = [topology.crossover_sources(n, step, s, 0) for s in range(len(SEGMENTS))]
        sends = [(x[s], dst) for s, sources in enumerate(plans)
                 for dst in topology.receivers(sources, me)]
        comm.exchange(sends, [(torch.empty(SEGMENTS[s]), sources[me])
                              for s, sources in enumerate(plans)])


def test_crossover_on_hosts_of_one_costs_its_bytes_over_the_link() -> None:
    # Each rank sends |x| and receives |x| per step over its machine's own link: the wire floor.
    # A port that stays idle behind a reservation made for later charged ~1.5x this.
    network = NetworkModel(hosts=(0, 1, 2, 3), host_link=Link(100e-6, BANDWIDTH))
    world = SimWorld(4, network)
    world.run(_crossover_exchange)
    floor = 4 * sum(SEGMENTS) / BANDWIDTH
    assert max(world.clocks()) / STEPS == pytest.approx(floor, rel=0.02)


def test_busy_stretches_survive_a_checkpoint() -> None:
    network = NetworkModel(hosts=(0, 1, 2, 3), host_link=Link(100e-6, BANDWIDTH))
    world = SimWorld(4, network)
    world.run(_crossover_exchange)
    saved = world.state_dict()
    again = SimWorld(4, network)
    again.load_state_dict(saved)
    assert again.state_dict()["host_ingress_busy"] == saved["host_ingress_busy"]
    assert [r["ingress_busy"] for r in again.state_dict()["ranks"]] == [
        r["ingress_busy"] for r in saved["ranks"]]
