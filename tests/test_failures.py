"""Worker failures and hostile input (issue 6): a killed worker ends a run with its rank and last
step, or with --on-failure continue the survivors finish without it; push-sum keeps exact books
over the survivors; bad headers are ProtocolErrors naming the sender; services stay on loopback.

Real-process tests start their own processes (file rendezvous) and have timeouts. Kills are
deterministic (DISTSGD_KILL makes a rank SIGKILL itself after a step, drawn from a printed seed);
tests/test_processes.py keeps one kill from the outside.
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distsgd
from distsgd import cli, launch, mixing
from distsgd.algorithms.base import WorkerContext
from distsgd.algorithms.ps import PUSH, PUSH_SPARSE, check_header
from distsgd.algorithms.sgp import SGP
from distsgd.comm.base import Comm, Group
from distsgd.comm.torch.wire import HEADER_LEN, HEADER_TAG, MAGIC, parse_header
from distsgd.errors import PeerDied, ProtocolError, UsageError, WorkerFailure
from distsgd.optimizer import serve

SEED = 20261121  # the kill steps are drawn from it; printed with every failure


def _kill_step(algorithm: str, low: int = 5, high: int = 40) -> int:
    return random.Random(f"{SEED}-{algorithm}").randint(low, high)


def _run_processes(tag: str) -> list[int]:
    """The pids of processes (of this user) started with DISTSGD_TEST_TAG=tag."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"DISTSGD_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# ------------------------------------------------------------------ --on-failure stop
@pytest.mark.processes
@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("algorithm, victim", [
    ("allreduce", 2),  # synchronous collective
    ("sgp", 1),  # gossip
    ("downpour", 2),  # parameter server (rank 0 is the server)
    ("easgd-async", 3),  # elastic, through a server
])
def test_a_killed_worker_ends_the_run_naming_its_rank_and_last_step(
    algorithm: str, victim: int, tmp_path: Path,
) -> None:
    step = _kill_step(algorithm)
    tag = uuid.uuid4().hex
    env = {**os.environ, "DISTSGD_KILL": f"{victim}:{step}", "DISTSGD_TEST_TAG": tag}
    proc = subprocess.run(
        [sys.executable, "-m", "distsgd", "train", "-a", algorithm, "--backend", "processes",
         "--workers", "3", "--steps", "100000", "--eval-every", "5", "--timeout", "60",
         "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=240, env=env)
    context = f"seed {SEED}: rank {victim} killed after step {step}; stderr: {proc.stderr[-800:]}"
    assert proc.returncode == 1, context
    assert f"worker {victim} died: killed by signal SIGKILL after step {step}" in proc.stderr, \
        context
    assert "Traceback" not in proc.stderr, context
    assert _run_processes(tag) == [], context  # no process of the run is left
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(r["step"] <= step for r in lines), context  # kept, and readable
    assert not (tmp_path / "summary.json").exists()


# ---------------------------------------------------------------- --on-failure continue
def test_continue_is_refused_for_algorithms_whose_survivors_cannot_carry_on() -> None:
    for algorithm in ("allreduce", "local-sgd", "easgd", "crossover", "diloco", "powersgd"):
        with pytest.raises(UsageError) as info:
            distsgd.RunConfig.create(algorithm=algorithm, on_failure="continue")
        assert str(info.value) == (
            f"on_failure 'continue' does not support {algorithm!r}; valid algorithms: "
            "adpsgd, async-sparse, downpour, eamsgd, easgd-async, gosgd, sgp, ssp")
    with pytest.raises(UsageError, match="unknown on_failure 'retry'; valid choices: stop, "
                                         "continue"):
        distsgd.RunConfig.create(algorithm="sgp", on_failure="retry")


def test_the_command_line_refuses_continue_for_allreduce_with_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["train", "-a", "allreduce", "--on-failure", "continue"]) == 2
    err = capsys.readouterr().err
    assert "on_failure 'continue' does not support 'allreduce'; valid algorithms: " in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_the_kill_variable_is_checked_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for bad in ("1", "x:3", "7:3", "1:-2"):
        monkeypatch.setenv("DISTSGD_KILL", bad)
        with pytest.raises(UsageError, match=r"is not RANK:STEP with RANK in 0..2 and STEP >= 0"):
            launch.launch(_return_rank, 3)


def _return_rank(comm: Comm) -> int:
    return comm.rank


# Each reaches the foundation bar (0.90 on digits, default cnn) with one of its four workers
# killed at a step in 30..50; the epochs are the fewest of 8, 15 and 30 that did so with a margin
# (measured, with the accuracies, in docs/failures.md). Together they take minutes on 2 cores.
CONTINUE = [("gosgd", 30), ("sgp", 8), ("downpour", 15), ("easgd-async", 15),
            ("eamsgd", 15), ("ssp", 8), ("async-sparse", 30)]


@pytest.mark.processes
@pytest.mark.timeout(600)
@pytest.mark.parametrize("algorithm, epochs", CONTINUE)
def test_survivors_finish_and_reach_the_bar_after_a_worker_dies(
    algorithm: str, epochs: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    roles = distsgd.Roles.of(algorithm, 4)
    victim = roles.workers[2]  # neither a server nor the evaluating worker (the first worker)
    step = _kill_step(algorithm, 30, 50)
    monkeypatch.setenv("DISTSGD_KILL", f"{victim}:{step}")
    result = distsgd.train(algorithm=algorithm, workers=4, backend="processes", epochs=epochs,
                           on_failure="continue", out=str(tmp_path))
    summary = result.summary
    context = f"seed {SEED}: rank {victim} killed after step {step}; summary {summary}"
    (failed,) = summary["failed_workers"]
    died = failed.pop("real_time_s")
    assert failed == {"rank": victim, "worker": 2, "last_step": step}, context
    # On the metrics' clock, which starts at the evaluating worker's first step: an asynchronous
    # worker may run its steps and die before that (negative), never before the run started.
    assert -summary["startup_s"] < died < summary["real_time_s"], context
    assert sorted(w.rank for w in result.workers) == sorted(
        set(range(roles.world_size)) - {victim}), context
    assert summary["steps"] > step and summary["test_accuracy"] >= 0.90, context
    last = result.metrics[-1]
    assert last["bytes_sent_per_worker"][2] > 0  # its bytes up to its last report are kept


@pytest.mark.processes
@pytest.mark.timeout(300)
def test_the_death_of_the_evaluating_worker_ends_a_continue_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISTSGD_KILL", "1:12")  # ssp: rank 0 is the server, rank 1 evaluates
    with pytest.raises(WorkerFailure, match=r"^worker 1 died: killed by signal SIGKILL after "
                                            r"step 12$"):
        distsgd.train(algorithm="ssp", workers=3, backend="processes", steps=100000,
                      eval_every=4, on_failure="continue", out=str(tmp_path), timeout=60)


# ------------------------------------------------------ push-sum books over the survivors
class _Net:
    """In-process point-to-point for the push-sum invariant: FIFO per pair, and deaths."""

    def __init__(self) -> None:
        self.queues: dict[tuple[int, int], collections.deque[torch.Tensor]] = (
            collections.defaultdict(collections.deque))
        self.dead: set[int] = set()
        self.cond = threading.Condition()


class _NetComm:
    """The few verbs SGP uses, raising `PeerDied` as TorchComm does once a peer is dead."""

    def __init__(self, net: _Net, rank: int, world_size: int) -> None:
        self.net, self.rank, self.world_size = net, rank, world_size

    def new_group(self, ranks: list[int] | tuple[int, ...]) -> Group:
        return Group(tuple(ranks))

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        with self.net.cond:
            if dst in self.net.dead:
                raise PeerDied(f"rank {dst} is dead", dst)
            self.net.queues[(self.rank, dst)].append(tensor.clone())
            self.net.cond.notify_all()

    def recv(self, out: torch.Tensor, src: int | None = None, timeout: float | None = None) -> int:
        assert src is not None
        with self.net.cond:
            queue = self.net.queues[(src, self.rank)]
            if not self.net.cond.wait_for(lambda: queue or src in self.net.dead, 60):
                raise TimeoutError(f"rank {self.rank}: recv from {src}")
            if not queue:
                raise PeerDied(f"rank {src} is dead", src)
            out.copy_(queue.popleft())
            return src

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
                 timeout: float | None = None) -> tuple[frozenset[int], frozenset[int]]:
        """As TorchComm's: dead peers are skipped and returned (unsent, unfilled)."""
        unsent, unfilled = set(), set()
        for tensor, dst in sends:
            try:
                self.send(tensor, dst)
            except PeerDied:
                unsent.add(dst)
        for out, src in recvs:
            try:
                self.recv(out, src)
            except PeerDied:
                unfilled.add(src)
        return frozenset(unsent), frozenset(unfilled)


def _model(rank: int) -> nn.Module:
    torch.manual_seed(rank)  # every worker starts from a different model
    return nn.Linear(3, 2).double()


def _push_sum_worker(net: _Net, rank: int, model: nn.Module, n: int, steps: int,
                     kill: tuple[int, int], out: dict[int, tuple[float, torch.Tensor]]) -> None:
    comm = _NetComm(net, rank, n)
    ctx = WorkerContext(comm, model, None, tuple(range(n)))  # type: ignore[arg-type]
    algorithm = SGP()
    state = algorithm.init(ctx)
    for step in range(steps):
        ctx.step = step
        algorithm.after_step(ctx, state)  # no gradient: only mixing moves x and w
        if (rank, step) == kill:
            with net.cond:  # what it holds dies with it
                out[rank] = (state.w, state.x.clone())
                net.dead.add(rank)
                net.cond.notify_all()
            return
    out[rank] = (state.w, state.x.clone())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim, death", [(2, 3), (0, 0), (5, 9)])
def test_push_sum_mass_of_the_survivors_is_the_total_minus_what_the_dead_held(
    victim: int, death: int,
) -> None:
    n, steps = 6, 16
    net: _Net = _Net()
    out: dict[int, tuple[float, torch.Tensor]] = {}
    models = [_model(r) for r in range(n)]  # built here: the seed is global to the threads
    x0 = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models]
    threads = [threading.Thread(target=_push_sum_worker,
                                args=(net, r, models[r], n, steps, (victim, death), out))
               for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(out) == n
    # What died with the victim: what it held, and what was sent to it and never taken.
    in_flight = [m for (_, dst), q in net.queues.items() if dst == victim for m in q]
    lost_w = out[victim][0] + sum(mixing.unpack_weight(m[-1:]) for m in in_flight)
    lost_x = out[victim][1] + sum((m[:-1] for m in in_flight), torch.zeros_like(x0[0]))
    survivors = [r for r in range(n) if r != victim]
    # Every message between survivors was taken; nothing else is queued.
    assert all(not q for (_, dst), q in net.queues.items() if dst != victim)
    # Halvings and sums of dyadic weights: exact.
    assert sum(out[r][0] for r in survivors) == n - lost_w
    assert 0 < lost_w < n
    torch.testing.assert_close(sum(out[r][1] for r in survivors) + lost_x,
                               sum(x0), rtol=0, atol=1e-12)
    # So x/w of every survivor stays an average of the survivors' mass, weighted by w.
    assert all(out[r][0] > 0 for r in survivors)


# --------------------------------------------------------------------------- hostile input
def _forge(comm: Comm, case: str) -> None:
    """Rank 1 sends rank 0 one forged message; rank 0 receives; the run must end with rank 0's
    ProtocolError naming rank 1 (see the test)."""
    if comm.rank == 1:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0], header[1], header[2], header[3], header[-1] = MAGIC, 0, 0, 1, MAGIC
        header[5] = 3  # a float32 tensor of shape (3,), the first message from rank 1 ...
        if case == "magic":
            header[0] = 0x1234
        elif case == "kind":
            header[1] = 9
        elif case == "dtype code":
            header[2] = 99
        elif case == "size":
            header[5] = 2**40
        elif case == "sequence":
            header[4] = 1  # ... unless it says it is the second
        elif case == "truncated":
            header = header[:5].clone()  # gloo part-fills the receiver's larger buffer
        if case == "layout":  # a well-formed message, of another dtype than the receiver's
            comm.send(torch.zeros(3, dtype=torch.float64), 0)
        else:
            dist.isend(header, 0, tag=HEADER_TAG).wait()
        return
    comm.recv(torch.empty(3), src=1, timeout=60)


@pytest.mark.processes
@pytest.mark.timeout(180)
@pytest.mark.parametrize("case, problem", [
    ("magic", "bad magic number 0x1234"),
    ("truncated", "a truncated header"),  # relies on gloo part-filling a larger buffer
    ("layout", "received a torch.float64 tensor of shape (3,) from rank 1 into a torch.float32"),
])
def test_a_forged_message_is_a_protocol_error_naming_the_sender(case: str, problem: str) -> None:
    with pytest.raises(WorkerFailure) as info:
        launch.launch(_forge, 2, args=(case,), timeout=120, comm_timeout=60)
    message = str(info.value)
    assert message.startswith("worker 0 failed: distsgd.errors.ProtocolError: rank 0 "), message
    assert "rank 1" in message and problem in message, message
    assert "\n" not in message


def _header_values(**changes: int) -> list[int]:
    """A valid header of a float32 tensor of shape (3,), with `changes` at named positions."""
    header = [MAGIC, 0, 0, 1, 0, 3] + [0] * (HEADER_LEN - 7) + [MAGIC]
    where = {"magic": 0, "kind": 1, "code": 2, "ndim": 3, "dim0": 5, "dim1": 6, "trailer": -1}
    for name, value in changes.items():
        header[where[name]] = value
    return header


@pytest.mark.parametrize("changes, problem", [
    ({"kind": 9}, "unknown message kind 9 (valid: 0, 1, 2)"),
    ({"code": 99}, "unknown dtype code 99 (valid: 0..11)"),
    ({"code": -1}, "unknown dtype code -1"),
    ({"ndim": 9}, "bad shape: 9 dimensions"),
    ({"dim0": -3}, "bad shape: 1 dimensions"),
    ({"dim1": 4}, "bad shape: 1 dimensions"),  # a size past ndim
    ({"dim0": 2**40}, "exceeds the limit of 2147483648 bytes"),
    ({"ndim": 2, "dim0": 2**62, "dim1": 4}, "exceeds the limit"),  # 2**64 elements: no wrap
    ({"trailer": 0}, "a truncated header of 14 int64"),
    ({"magic": 7}, "bad magic number 0x7"),
])
def test_every_header_field_is_checked_before_anything_is_allocated(
    changes: dict[str, int], problem: str,
) -> None:
    assert parse_header(_header_values()) == (0, torch.float32, [3])
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_header(_header_values(**changes))


def _forge_for_server(comm: Comm, header: list[float]) -> None:
    """Rank 0 serves downpour; rank 1 sends it one forged header."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    if comm.rank == 0:
        serve(model, "downpour", lr=0.1, comm=comm)
        return
    ctx = WorkerContext(comm, model, None, (1,), (0,))
    ctx.comm.send(torch.tensor(header, dtype=torch.float64), 0)
    ctx.comm.recv(torch.empty(1), src=0, timeout=60)  # never answered: the server fails


@pytest.mark.processes
@pytest.mark.timeout(180)
def test_a_forged_header_to_a_server_is_a_protocol_error_naming_the_sender() -> None:
    with pytest.raises(WorkerFailure) as info:
        launch.launch(_forge_for_server, 2, args=([42, 0, 0, 0],), timeout=120, comm_timeout=60)
    assert str(info.value) == ("worker 0 failed: distsgd.errors.ProtocolError: server rank 0 "
                               "rejected a header from rank 1: unknown kind 42")


@pytest.mark.parametrize("header, problem", [
    ([PUSH_SPARSE, 0, 0, -5], "count -5 is outside 0..10 (the shard's size)"),
    ([PUSH_SPARSE, 0, 0, 1e12], "count 1000000000000 is outside 0..10"),
    ([PUSH, 7, 0, 0], "version 7 is outside 0..0 (this server's)"),
    ([PUSH, -1, 0, 0], "version -1 is outside 0..0"),
    ([PUSH, float("nan"), 0, 0], "kind, version and count must be whole numbers"),
    ([PUSH + 0.5, 0, 0, 0], "kind, version and count must be whole numbers"),
    ([PUSH_SPARSE, 0, 0, float("inf")], "kind, version and count must be whole numbers"),
    ([PUSH, 0, float("nan"), 0], "its clock is NaN"),
])
def test_a_server_checks_every_header_field(header: list[float], problem: str) -> None:
    valid = torch.tensor([PUSH_SPARSE, 0, -math.inf, 10], dtype=torch.float64)
    server = dict(version=0, size=10, rank=0)  # a fresh server of a 10-element shard
    assert check_header(valid, src=1, **server) == (PUSH_SPARSE, 0, -math.inf, 10)
    with pytest.raises(ProtocolError) as info:
        check_header(torch.tensor(header, dtype=torch.float64), src=2, **server)
    assert str(info.value).startswith("server rank 0 rejected a header from rank 2: ")
    assert problem in str(info.value)


# -------------------------------------------------------------------------------- loopback
def _sockets(comm: Comm) -> list[str]:
    """The local addresses of this worker's TCP sockets, after some traffic."""
    comm.barrier()
    if comm.rank == 0:
        comm.send(torch.ones(2), 1)
    elif comm.rank == 1:
        comm.recv(torch.empty(2), src=0)
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    addresses = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                addresses.append(fields[1].rsplit(":", 1)[0])
    return addresses


@pytest.mark.processes
@pytest.mark.timeout(180)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_workers_only_listen_and_talk_on_loopback() -> None:
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    for rank, addresses in enumerate(launch.launch(_sockets, 3, timeout=120, comm_timeout=60)):
        assert addresses, f"rank {rank} has no TCP socket: gloo's connections not found"
        assert set(addresses) <= loopback, (rank, addresses)
