"""`distsgd.Roles` (which ranks serve, which train) and `distsgd.simulate_ranks`, the one helper
that runs a body on every rank of a simulated run with those roles."""

from __future__ import annotations

import pytest
import torch
from tiny import batch, make_model

import distsgd
from distsgd import algorithms
from distsgd.comm.base import Comm
from distsgd.comm.sim import NetworkModel, SimWorld
from distsgd.errors import UsageError

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("name", sorted(algorithms.REGISTRY))
@pytest.mark.parametrize("workers", [1, 3])
def test_servers_take_the_first_ranks_and_worker_i_is_rank_servers_plus_i(name: str,
                                                                          workers: int) -> None:
    algorithm = algorithms.create(name)
    servers = algorithm.servers(workers)
    roles = distsgd.Roles.of(algorithm, workers)
    assert roles.servers == tuple(range(servers))
    assert roles.workers == tuple(range(servers, servers + workers))
    assert roles.world_size == servers + workers
    assert [roles.index(r) for r in roles.workers] == list(range(workers))
    assert [roles.is_server(r) for r in range(roles.world_size)] == [True] * servers + [
        False] * workers
    assert distsgd.Roles.of_world(algorithm, roles.world_size) == roles
    assert distsgd.Roles.of(name, workers) == roles  # a name works too


def test_roles_refuse_what_does_not_exist() -> None:
    with pytest.raises(UsageError, match="workers"):
        distsgd.Roles.of("ssp", 0)
    two_shards = distsgd.create("downpour", shards=2)  # 2 servers: no world of 2 ranks
    with pytest.raises(UsageError, match="cannot split a world of 2 ranks"):
        distsgd.Roles.of_world(two_shards, 2)
    with pytest.raises(ValueError, match="rank 0 is not a training worker"):
        distsgd.Roles.of("ssp", 2).index(0)


def test_simulate_ranks_gives_each_rank_its_role_and_returns_by_rank() -> None:
    seen: list[tuple[int, int, bool, int]] = []

    def body(comm: Comm, roles: distsgd.Roles) -> int:
        seen.append((comm.rank, comm.world_size, roles.is_server(comm.rank),
                     torch.get_num_threads()))
        return 10 * comm.rank

    torch.set_num_threads(2)  # (the suite's fixture restores its own setting afterwards)
    assert distsgd.simulate_ranks("downpour", 3, body) == [0, 10, 20, 30]
    # One intra-op thread while the ranks share the process, the caller's setting afterwards.
    assert sorted(seen) == [(0, 4, True, 1), (1, 4, False, 1), (2, 4, False, 1),
                            (3, 4, False, 1)]
    assert torch.get_num_threads() == 2


def test_simulate_ranks_trains_servers_and_workers_like_a_hand_made_world() -> None:
    algorithm = distsgd.create("ssp", s=1)

    def body(comm: Comm, roles: distsgd.Roles) -> torch.Tensor:
        model = make_model()
        if roles.is_server(comm.rank):
            distsgd.serve(model, algorithm, lr=0.1, comm=comm)
            return torch.empty(0)
        opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                           algorithm, comm=comm, seed=1)
        for step in range(4):
            x, y = batch(roles.index(comm.rank), step)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            comm.elapse(1e-3 * (1 + comm.rank))
            opt.step()
            opt.zero_grad()
        opt.finish()
        return opt.ctx.flat.get()

    def by_hand(comm: Comm) -> torch.Tensor:
        return body(comm, distsgd.Roles.of_world(algorithm, comm.world_size))

    helper = distsgd.simulate_ranks(algorithm, 3, body, network=NetworkModel(latency=1e-4))
    hand = SimWorld(4, NetworkModel(latency=1e-4)).run(by_hand)
    assert len(helper) == 4 and helper[0].numel() == 0  # rank 0 is the server
    for a, b in zip(helper, hand, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(helper[1], helper[2])  # asynchronous: the workers differ


def test_simulate_ranks_runs_in_a_given_world_of_the_right_size() -> None:
    world = SimWorld(4)
    assert distsgd.simulate_ranks("ssp", 3, lambda comm, roles: comm.now(), world=world) == [
        0.0] * 4
    with pytest.raises(UsageError, match="the world has 3 ranks but 3 workers need 4"):
        distsgd.simulate_ranks("ssp", 3, lambda comm, roles: None, world=SimWorld(3))
    with pytest.raises(UsageError, match="either network or world"):
        distsgd.simulate_ranks("ssp", 3, lambda comm, roles: None, world=SimWorld(4),
                               network=NetworkModel())
