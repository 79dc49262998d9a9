"""The process launcher: results, failures named by worker, no orphans, no collisions."""

from __future__ import annotations

import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from distsgd.comm.base import Comm, current
from distsgd.comm.torch.group import file_rendezvous, free_port, from_torchrun_env, is_torchrun
from distsgd.errors import PeerDied, UsageError, WorkerFailure
from distsgd.forkserver import START_METHOD_ENV, start_method
from distsgd.launch import launch

pytestmark = [pytest.mark.timeout(120), pytest.mark.processes]

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------ worker functions
def identify(comm: Comm, tag: str) -> tuple[str, int, int, bool, int]:
    total = comm.all_reduce_(torch.tensor([comm.rank]))
    return tag, comm.rank, comm.world_size, current() is comm, int(total.item())


def fail_in(comm: Comm, bad_rank: int, usage: bool) -> None:
    comm.barrier()
    if comm.rank == bad_rank:
        if usage:
            raise UsageError("steps=-1 is out of range: valid values lie in [1, inf)")
        raise ValueError(f"boom from rank {comm.rank}")
    comm.recv(torch.empty(1), bad_rank)  # blocked until the launcher ends the run


def _write_pid(folder: str, rank: int) -> None:
    Path(folder, f"{rank}.pid").write_text(str(os.getpid()))


def kill_rank_one(comm: Comm, folder: str) -> None:
    _write_pid(folder, comm.rank)
    comm.barrier()  # everyone is up before the kill
    if comm.rank == 1:
        Path(folder, "killed_at").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    if comm.rank == 0:
        comm.all_reduce_(torch.zeros(1))  # fails too (PeerLost): not the cause to report
    comm.recv(torch.empty(1), 1)


def block_forever(comm: Comm, folder: str) -> None:
    _write_pid(folder, comm.rank)
    comm.recv(torch.empty(1), (comm.rank + 1) % comm.world_size)


def sleep(comm: Comm, seconds: float) -> None:
    time.sleep(seconds)


def unpicklable_result(comm: Comm) -> Any:
    return threading.Lock()


def report_environment(comm: Comm, tag: str) -> tuple[str | None, str | None, str | None, int]:
    # One write per line: two ranks share the stream, and print's text and newline are two.
    os.write(1, f"rank {comm.rank} says {tag} on stdout\n".encode())
    os.write(2, f"rank {comm.rank} says {tag} on stderr\n".encode())
    return (os.environ.get("DISTSGD_TEST_OS"), os.environ.get("DISTSGD_TEST_ENV"),
            os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads())


def parent_pid(comm: Comm) -> int:
    return os.getppid()


# -------------------------------------------------------------------------- helpers
def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _descendants(pid: int) -> list[int]:
    parents = _parents()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _worker_children() -> list[int]:
    """Live processes started by this process, except the long-lived helpers of
    multiprocessing (the forkserver, the resource tracker): workers left behind."""
    server = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if pid != server and "resource_tracker" not in cmdline and _alive(pid):
            pids.append(pid)
    return pids


def _pids(folder: Path, n: int) -> list[int]:
    return [int((folder / f"{r}.pid").read_text()) for r in range(n)]


def _wait_for(condition: Any, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


# ---------------------------------------------------------------------------- tests
def test_two_launches_at_once_return_their_own_results_in_rank_order() -> None:
    results: dict[str, Any] = {}

    def run(tag: str) -> None:
        results[tag] = launch(identify, 2, args=(tag,), timeout=100, comm_timeout=60)

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {tag: [(tag, 0, 2, True, 1), (tag, 1, 2, True, 1)] for tag in "ab"}


def test_a_worker_that_raises_is_named_with_its_traceback() -> None:
    with pytest.raises(WorkerFailure) as info:
        launch(fail_in, 3, args=(2, False), timeout=100, comm_timeout=60)
    assert str(info.value) == "worker 2 failed: ValueError: boom from rank 2"
    remote = str(info.value.__cause__)
    assert "Traceback" in remote and "in fail_in" in remote
    assert not _worker_children()


def test_a_usage_error_in_a_worker_keeps_its_type_and_message() -> None:
    with pytest.raises(UsageError) as info:
        launch(fail_in, 2, args=(0, True), timeout=100, comm_timeout=60)
    assert str(info.value) == "steps=-1 is out of range: valid values lie in [1, inf)"
    assert not isinstance(info.value, WorkerFailure)


@linux_only
def test_a_killed_worker_ends_the_run_at_once_and_leaves_no_process(tmp_path: Path) -> None:
    with pytest.raises(WorkerFailure) as info:
        launch(kill_rank_one, 3, args=(str(tmp_path),), timeout=100, comm_timeout=60)
    noticed = time.time()
    assert str(info.value) == "worker 1 died: killed by signal SIGKILL"
    # The others were blocked in a recv with a 60 s timeout: the launcher did not wait for it.
    assert noticed - float((tmp_path / "killed_at").read_text()) < 5.0
    assert not any(_alive(pid) for pid in _pids(tmp_path, 3))
    assert not _worker_children()


@linux_only
def test_workers_die_with_the_launching_process(tmp_path: Path) -> None:
    script = (f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent)!r}]\n"
              "import test_launch\nfrom distsgd.launch import launch\n"
              f"launch(test_launch.block_forever, 2, args=({str(tmp_path)!r},), comm_timeout=60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        # A first launch starts the forkserver, which imports torch and more: slow on a busy
        # machine.
        assert _wait_for(lambda: all((tmp_path / f"{r}.pid").exists() for r in range(2)), 100)
        pids = _pids(tmp_path, 2)
        assert all(_alive(pid) for pid in pids)
        started = _descendants(parent.pid)  # the workers, and the forkserver if there is one
        assert set(pids) <= set(started)
    finally:
        parent.kill()
        parent.wait()
    assert _wait_for(lambda: not any(_alive(pid) for pid in started), 10)


def test_the_deadline_ends_a_run_that_does_not_finish() -> None:
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"did not finish within its deadline of 3 s.*\[0\]"):
        launch(sleep, 1, args=(60.0,), timeout=3, comm_timeout=60)
    assert time.monotonic() - start < 15


def test_results_and_functions_must_be_picklable() -> None:
    with pytest.raises(UsageError, match="module-level function"):
        launch(lambda comm: comm.rank, 1)
    with pytest.raises(WorkerFailure, match="worker 0 failed: its result cannot be pickled"):
        launch(unpicklable_result, 1, timeout=100)


def test_arguments_are_checked_before_anything_starts() -> None:
    for kwargs in ({"world_size": 0}, {"world_size": 2, "timeout": -1.0},
                   {"world_size": 2, "comm_timeout": 0.0}):
        with pytest.raises(UsageError):
            launch(identify, **kwargs)  # type: ignore[arg-type]


def test_without_torchrun_there_is_no_torchrun_communicator(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not is_torchrun()
    assert from_torchrun_env() is None
    monkeypatch.setenv("RANK", "0")  # one variable alone is not torchrun
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not is_torchrun()
    assert from_torchrun_env() is None


def test_rendezvous_helpers() -> None:
    port = free_port()
    assert 0 < port < 65536
    with file_rendezvous() as url:
        assert url.startswith("file://")
        folder = Path(url.removeprefix("file://")).parent
        assert folder.is_dir() and not any(folder.iterdir())
    assert not folder.exists()


def outlive_rank_two(comm: Comm) -> dict[str, Any]:
    """Rank 2 notes steps 0..2 and is killed after step 2 (DISTSGD_KILL); the others then see
    PeerDied from every verb that involves it, and rank 1's next any-source recv announces it
    (rank 0 sends nothing before rank 1 has looked, so that recv has no message to deliver)."""
    comm.barrier()
    for step in range(3):
        comm.note_step(step)
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while not comm.deaths() and time.monotonic() < deadline:
        time.sleep(0.05)
    seen["deaths"] = {r: last for r, (last, _) in comm.deaths().items()}
    checks = [("send", lambda: comm.send(torch.ones(2), 2)),
              ("recv", lambda: comm.recv(torch.empty(2), src=2))]
    if comm.rank == 1:
        checks.append(("any", lambda: comm.recv(torch.empty(2))))
    for verb, call in checks:
        try:
            call()
        except PeerDied as e:
            seen[verb] = e.rank
    got = torch.empty(2)  # ranks 0 and 1 still talk
    if comm.rank == 1:
        comm.send(torch.full((2,), 1.0), 0)
        comm.recv(got, src=0)
    elif comm.rank == 0:
        comm.recv(got, src=1)
        comm.send(torch.full((2,), 0.0), 1)
    seen["got"] = got.tolist()
    return seen


def test_with_continue_the_survivors_carry_on_without_a_dead_rank() -> None:
    results = launch(outlive_rank_two, 3, timeout=100, comm_timeout=60, on_failure="continue",
                     env={"DISTSGD_KILL": "2:2"})
    assert results[2] is None  # died: no result
    assert results[0] == {"deaths": {2: 2}, "send": 2, "recv": 2, "got": [1.0, 1.0]}
    assert results[1] == {"deaths": {2: 2}, "send": 2, "recv": 2, "any": 2, "got": [0.0, 0.0]}


def test_with_continue_an_essential_rank_still_ends_the_run() -> None:
    with pytest.raises(WorkerFailure, match=r"^worker 0 died: killed by signal SIGKILL after "
                                            r"step 2$"):
        launch(outlive_rank_two, 3, timeout=100, comm_timeout=60, on_failure="continue",
               essential=[0], env={"DISTSGD_KILL": "0:2"})


# --------------------------------------------------------------- how workers start
@linux_only
def test_workers_are_forked_by_a_forkserver_unless_spawn_is_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    assert start_method("cpu") == "forkserver" and start_method("cuda") == "spawn"
    forked = launch(parent_pid, 2, timeout=100, comm_timeout=60)
    server = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    assert forked == [server, server] and server != os.getpid()
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    assert launch(parent_pid, 2, timeout=100, comm_timeout=60) == [os.getpid()] * 2
    monkeypatch.setenv(START_METHOD_ENV, "fork")
    with pytest.raises(UsageError, match=r"^DISTSGD_START_METHOD='fork' is not a start method; "
                                         r"valid choices: forkserver, spawn$"):
        launch(parent_pid, 2)


def test_each_launch_has_its_own_environment_and_the_current_streams(
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # A forkserver started now (if none runs yet) has the uncaptured streams and no variable.
    monkeypatch.delenv("DISTSGD_TEST_OS", raising=False)
    with capfd.disabled():
        launch(identify, 1, args=("warm-up",), timeout=100, comm_timeout=60)
    omp = os.environ.get("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DISTSGD_TEST_OS", "os")
    first = launch(report_environment, 2, args=("one",), env={"DISTSGD_TEST_ENV": "env"},
                   timeout=100, comm_timeout=60)
    monkeypatch.delenv("DISTSGD_TEST_OS")
    second = launch(report_environment, 2, args=("two",), timeout=100, comm_timeout=60)
    assert first == [("os", "env", omp, 1)] * 2
    assert second == [(None, None, omp, 1)] * 2
    assert "DISTSGD_TEST_ENV" not in os.environ
    out, err = capfd.readouterr()
    for stream, text in (("stdout", out), ("stderr", err)):
        said = sorted(line for line in text.splitlines() if " says " in line)
        assert said == sorted(f"rank {r} says {tag} on {stream}" for tag in ("one", "two")
                              for r in (0, 1)), text


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_function_of_the_main_script_runs_in_the_workers(tmp_path: Path, method: str) -> None:
    script = tmp_path / "main_script.py"
    script.write_text(f"import sys; sys.path[:0] = [{str(TESTS.parent)!r}]\n"
                      "from distsgd.launch import launch\n\n"
                      "def double_rank(comm):\n    return 2 * comm.rank\n\n"
                      'if __name__ == "__main__":\n'
                      "    print(launch(double_rank, 2, timeout=100, comm_timeout=60))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=110, env={**os.environ, START_METHOD_ENV: method})
    assert (done.returncode, done.stdout) == (0, "[0, 2]\n"), done.stderr[-3000:]
