"""Real gloo processes: parity with the simulator and with DDP, asynchronous training, failures.

Each test starts its own processes (a file rendezvous, so runs never collide) and has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import distsgd
from distsgd import algorithms, launch
from distsgd.comm.base import Comm

pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]

# From the registry, so that a new algorithm is in the parity tests without anyone adding it.
SYNC = sorted(n for n, c in algorithms.REGISTRY.items() if c.synchronous)
ASYNC = sorted(n for n, c in algorithms.REGISTRY.items() if not c.synchronous)
# Algorithms that need more than 15 epochs to settle above the bar, with the reason.
EPOCHS = {
    # swings widely while its residuals build up (server momentum on 1% top-k bursts)
    "async-sparse": 30,
}
# Settings under which a synchronous algorithm whose default exchange comes after the parity
# test's 12 steps exchanges within them (the test fails, saying so, when one is missing).
PARITY_SETTINGS: dict[str, dict[str, Any]] = {}


PARITY_RUNS = [
    *[(a, PARITY_SETTINGS.get(a, {})) for a in SYNC],
    ("sgp", {"peers": 2}),
    ("crossover", {"groups": 2, "segments": 3}),
]


@pytest.mark.parametrize("algorithm, settings", PARITY_RUNS, ids=[
    ",".join([a, *(f"{k}={v}" for k, v in s.items())]) for a, s in PARITY_RUNS])
def test_synchronous_algorithms_match_the_simulator(algorithm: str, settings: dict[str, Any],
                                                    tmp_path: Path) -> None:
    options = dict(algorithm=algorithm, hyperparameters=settings, workers=4, steps=12,
                   eval_every=6, model="mlp", seed=5)
    sim = distsgd.train(**options, backend="sim", out=str(tmp_path / "sim"))
    # Parity of runs that exchange nothing would check nothing: every worker sends something
    # besides the start's broadcast of worker 0's model.
    silent = [w.rank for w in sim.workers
              if not any(n for verb, n in w.bytes_by_verb.items() if verb != "broadcast")]
    assert not silent, (f"{algorithm}: workers {silent} exchange nothing in 12 steps; give it "
                        "settings in PARITY_SETTINGS")
    real = distsgd.train(**options, backend="processes", out=str(tmp_path / "real"))
    for s, r in zip(sim.workers, real.workers, strict=True):
        # The same arithmetic in the same order, except gloo's all-reduce, which sums in its
        # own order: float32 rounding only. Point-to-point algorithms match bit for bit.
        torch.testing.assert_close(r.state, s.state, atol=1e-5, rtol=1e-4)
        assert r.bytes_by_verb == s.bytes_by_verb  # one byte convention on both backends
    assert [m["step"] for m in real.metrics] == [m["step"] for m in sim.metrics]
    assert real.summary["test_accuracy"] == pytest.approx(sim.summary["test_accuracy"], abs=0.01)
    assert real.metrics[-1]["virtual_time_s"] is None


def _ddp_against_allreduce(comm: Comm, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In one process of a launch: the same model and batches, with DDP and with distsgd."""

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(100 * step + comm.rank)
        return torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)

    ddp_model = model()
    ddp = torch.nn.parallel.DistributedDataParallel(ddp_model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x, y = batch(step)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()

    ours_model = model()
    ours = distsgd.DistributedOptimizer(
        ours_model, torch.optim.SGD(ours_model.parameters(), lr=0.1, momentum=0.9),
        distsgd.AllReduce(), comm=comm)
    for step in range(steps):
        x, y = batch(step)
        nn.functional.cross_entropy(ours_model(x), y).backward()
        ours.step()
        ours.zero_grad()

    def flat(m: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    return flat(ddp_model), flat(ours_model)


def test_allreduce_matches_distributed_data_parallel() -> None:
    results = launch.launch(_ddp_against_allreduce, 3, args=(10,), timeout=180)
    for ddp, ours in results:
        # Both average gradients with a gloo all-reduce; DDP buckets and scales before summing
        # (g/N summed) where we sum then divide: float32 rounding only.
        torch.testing.assert_close(ours, ddp, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ASYNC)
def test_asynchronous_algorithms_train_on_four_processes(algorithm: str, tmp_path: Path) -> None:
    result = distsgd.train(algorithm=algorithm, workers=4, backend="processes",
                           epochs=EPOCHS.get(algorithm, 15), out=str(tmp_path))
    summary = result.summary
    assert all(torch.isfinite(w.state).all() for w in result.workers if w.state.numel())
    assert summary["test_accuracy"] >= 0.90
    if algorithms.create(algorithm).servers(4):  # parameter servers measure staleness
        assert summary["staleness_mean"] is not None and summary["staleness_max"] >= 0
        assert sum(summary["staleness_histogram"]) > 0


# -------------------------------------------------------------------------------- torchrun
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3",
            "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0"]
REPO = Path(__file__).resolve().parent.parent


def test_torchrun_runs_the_cli_with_a_server_rank(tmp_path: Path) -> None:
    proc = subprocess.run([*TORCHRUN, "-m", "distsgd", "train", "-a", "downpour", "--workers",
                           "2", "--steps", "30", "--eval-every", "10", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["backend"] == "torchrun" and summary["workers"] == 2
    assert summary["steps"] == 30 and summary["virtual_time_s"] is None
    assert summary["staleness_mean"] is not None  # fetched from the server rank


@pytest.mark.parametrize("algorithm", ["ssp", "sgp"])
def test_torchrun_runs_a_custom_training_loop(algorithm: str) -> None:
    proc = subprocess.run([*TORCHRUN, str(REPO / "examples" / "custom_loop.py"), "--algorithm",
                           algorithm], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    workers = 2 if algorithm == "ssp" else 3
    line = next(x for x in proc.stdout.splitlines() if x.startswith(f"{algorithm}:"))
    assert f"{workers} workers" in line
    assert float(line.rsplit(" ", 1)[1]) > 0.7


# ------------------------------------------------------------------------------- failures
def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its exit status waits to be read


def _rank_pid(root: int, rank: int) -> int | None:
    for pid in _descendants(root):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == f"distsgd-rank{rank}":
                return pid
        except OSError:
            continue
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find ranks")
@pytest.mark.parametrize("algorithm, victim, role", [
    ("allreduce", 2, "worker"), ("downpour", 0, "server"), ("gosgd", 1, "worker"),
])
def test_a_killed_rank_ends_the_run_with_a_clear_message(
    algorithm: str, victim: int, role: str, tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "distsgd", "train", "-a", algorithm, "--backend", "processes",
         "--workers", "3", "--steps", "100000", "--eval-every", "20", "--timeout", "20",
         "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until the run is under way
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run did not start within 120 s")
        pid = _rank_pid(proc.pid, victim)
        assert pid is not None, f"no process named distsgd-rank{victim}"
        run_processes = _descendants(proc.pid)
        assert len(run_processes) >= 3
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    # A training worker's last step is named (the run's first metrics lines show it had begun);
    # a server takes no steps.
    died = re.search(rf"worker {victim} died: killed by signal SIGKILL( after step (\d+))?\n", err)
    assert died is not None, err
    assert (died.group(2) is not None and int(died.group(2)) >= 20) == (role == "worker"), err
    assert "Traceback" not in err
    assert took < 20  # within the configured timeout
    # No orphan left behind: every process of the run is gone (an orphan would have been
    # re-parented, so look the recorded pids up rather than the dead launcher's children).
    time.sleep(0.5)
    alive = [p for p in run_processes if _alive(p)]
    assert alive == []
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) >= 2  # the metrics so far are kept
