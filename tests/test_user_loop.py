"""A user's own training loop: DistributedOptimizer as a torch optimizer (schedulers, groups, state,
zero_grad), sharding over the training workers, a world of one, finish() leaving the user's
process group alone, the __main__ guard, and torchrun's defaults (issue 12)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

import distsgd
from distsgd.comm.base import Comm

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(PYTHON).with_name("torchrun"))
TIMEOUT = 300  # seconds for a torchrun job (start-up alone is ~20 s on a loaded 2-core machine)
SERVER_ALGORITHMS = sorted(n for n, cls in distsgd.REGISTRY.items() if cls().servers(1))


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 4, generator=g), torch.randint(2, (8,), generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int,
          after: Callable[[], None] = lambda: None, set_to_none: bool = False) -> None:
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        after()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------------- a torch optimizer
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda e: 0.5**e),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=4),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=10),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=3),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=2),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_scheduler_drives_the_local_step(name: str) -> None:
    """Any scheduler accepts the DistributedOptimizer, warns of nothing, and the rates it sets are
    the ones the steps use: the run equals the wrapped optimizer's under the same scheduler."""
    runs = []
    for wrap in (False, True):
        model = tiny()
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = distsgd.DistributedOptimizer(model, inner) if wrap else inner
        scheduler = SCHEDULERS[name](opt)
        rates: list[float] = []

        def after(rates: list[float] = rates, groups: list[dict[str, Any]] = inner.param_groups,
                  scheduler: Any = scheduler) -> None:
            rates.append(groups[0]["lr"])
            scheduler.step()

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "optimizer.step() has been overridden"
            train(model, opt, 5, after)
        runs.append((flat(model), rates))
    assert runs[0][1] == runs[1][1] and len(set(runs[1][1])) > 1
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=0)


def test_reduce_on_plateau_sets_the_rate() -> None:
    model = tiny()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = distsgd.DistributedOptimizer(model, inner)
    scheduler = lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for _ in range(3):
        scheduler.step(1.0)  # no improvement: halve
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)


def test_groups_state_and_defaults_are_the_wrapped_optimizers() -> None:
    model = tiny()
    groups: list[dict[str, Any]] = [{"params": model[0].parameters()},
                                    {"params": model[2].parameters(), "lr": 0.01}]
    inner = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    opt = distsgd.DistributedOptimizer(model, inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.defaults is inner.defaults
    train(model, opt, 2)
    assert opt.state is inner.state and len(opt.state) == 4  # momentum buffers, once each
    opt.param_groups[1]["lr"] = 0.0  # a user's own lr change reaches the step
    frozen = flat(model[2]).clone()
    train(model, opt, 1)
    assert torch.equal(flat(model[2]), frozen)
    with pytest.raises(distsgd.UsageError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def test_state_dict_round_trip_with_a_scheduler() -> None:
    """Saved after 3 steps and loaded into a fresh optimizer (and scheduler), the next steps
    match the run that went on, including the scheduled rate after the load."""
    def start() -> tuple[nn.Module, distsgd.DistributedOptimizer, Any]:
        model = tiny()
        opt = distsgd.DistributedOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        return model, opt, lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    model, opt, scheduler = start()
    train(model, opt, 3, scheduler.step)
    saved, saved_sched = opt.state_dict(), scheduler.state_dict()
    other, reloaded, other_sched = start()
    reloaded.load_state_dict(saved)
    other_sched.load_state_dict(saved_sched)
    assert reloaded.ctx.step == 3 and reloaded.param_groups is reloaded.optimizer.param_groups
    train(model, opt, 2, scheduler.step)
    train(other, reloaded, 2, other_sched.step)
    torch.testing.assert_close(flat(other), flat(model), rtol=0, atol=0)


@pytest.mark.parametrize("set_to_none", [False, True])
def test_zero_grad_either_way_and_closure(set_to_none: bool) -> None:
    model, plain_model = tiny(), tiny()
    opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    train(model, opt, 3, set_to_none=set_to_none)
    train(plain_model, torch.optim.SGD(plain_model.parameters(), lr=0.1), 3)
    torch.testing.assert_close(flat(model), flat(plain_model), rtol=0, atol=0)

    def closure() -> float:
        opt.zero_grad(set_to_none=set_to_none)
        loss = nn.functional.cross_entropy(model(batch(9)[0]), batch(9)[1])
        loss.backward()
        return loss.item()

    assert isinstance(opt.step(closure), float) and opt.ctx.step == 4


# ------------------------------------------------------------------- a world of one
@pytest.mark.parametrize("name", SERVER_ALGORITHMS)
def test_parameter_server_algorithms_in_a_world_of_one_are_plain_sgd(name: str) -> None:
    model, plain_model = tiny(), tiny()
    assert not distsgd.is_server(name)
    opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), name)
    train(model, opt, 4)
    train(plain_model, torch.optim.SGD(plain_model.parameters(), lr=0.1), 4)
    torch.testing.assert_close(flat(model), flat(plain_model), rtol=0, atol=0)
    assert opt.shard(list(range(5))).indices == range(5)
    opt.finish()
    with pytest.raises(ValueError, match="not a server"):
        distsgd.serve(tiny(), name, lr=0.1)


@pytest.mark.parametrize("name", sorted(set(distsgd.REGISTRY) - {"easgd"}))
def test_every_algorithm_but_easgd_in_a_world_of_one_is_plain_sgd(name: str) -> None:
    """As the README says (synchronous EASGD's center variable still pulls the one worker)."""
    model, plain_model = tiny(), tiny()
    opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), name)
    train(model, opt, 30)
    train(plain_model, torch.optim.SGD(plain_model.parameters(), lr=0.1), 30)
    torch.testing.assert_close(flat(model), flat(plain_model), rtol=0, atol=1e-6)


def test_custom_loop_example_with_a_server_algorithm_in_a_world_of_one() -> None:
    pytest.importorskip("sklearn")
    done = run([PYTHON, "examples/custom_loop.py", "--algorithm", "ssp", "--steps", "20"])
    assert done.returncode == 0, done.stdout
    assert "ssp: 1 workers, held-out accuracy" in done.stdout


# ------------------------------------------------------------------- sharding
def test_shards_and_samplers_cover_the_data_over_the_workers_only() -> None:
    """ssp with 3 workers (and its server): each worker's shard and DistributedSampler hold a
    third of the data, disjoint and covering; the server holds none."""
    data = list(range(10))
    algorithm = distsgd.create("ssp")

    def body(comm: Comm, roles: distsgd.Roles) -> Any:
        model = tiny()
        if roles.is_server(comm.rank):
            with pytest.raises(ValueError, match="servers hold no data"):
                distsgd.sampler(data, algorithm, comm=comm)
            return distsgd.serve(model, algorithm, lr=0.1, comm=comm)
        opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                           algorithm, comm=comm)
        sampler = distsgd.sampler(data, algorithm, comm=comm, shuffle=False)
        assert (sampler.num_replicas, sampler.rank) == (3, opt.ctx.index)
        shard = [data[i] for i in opt.shard(data).indices]
        own: list[int] = list(opt.sampler(data, seed=1))
        opt.finish()
        return shard, own

    results = distsgd.simulate_ranks(algorithm, 3, body)[1:]
    shards = [r[0] for r in results]
    assert sorted(i for s in shards for i in s) == data and [len(s) for s in shards] == [4, 3, 3]
    assert all(len(r[1]) == 4 for r in results)  # DistributedSampler pads to equal shares
    assert {i for r in results for i in r[1]} == set(data)
    assert "sampler" in distsgd.__all__


# ------------------------------------------------------------------- the __main__ guard
def test_a_missing_main_guard_is_one_line(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""\
        import distsgd
        distsgd.train(algorithm="allreduce", workers=2, backend="processes", steps=2,
                      out={str(tmp_path / "run")!r})
        """))
    done = run([PYTHON, str(script)], timeout=120)
    assert done.returncode == 2, done.stdout
    assert done.stdout.strip().splitlines() == [
        f'distsgd: error: distsgd.train(backend="processes") is called at line 2 of {script}; '
        'put the code that starts the run under if __name__ == "__main__": (each worker '
        "process imports the main script again)"]
    assert not (tmp_path / "run").exists()


def test_a_guarded_call_is_not_refused(tmp_path: Path) -> None:
    script = tmp_path / "guarded.py"
    script.write_text(textwrap.dedent("""\
        from distsgd.spawn_guard import check_main_guard

        def main():
            check_main_guard("x")
            print("ran")

        if __name__ == "__main__":
            main()
        """))
    done = run([PYTHON, str(script)], timeout=60)
    assert (done.returncode, done.stdout) == (0, "ran\n")


# ------------------------------------------------------------------- real processes
USER_GROUP = """\
import torch, torch.distributed as dist, distsgd
from torch import nn
dist.init_process_group("gloo")
model = nn.Linear(3, 1)
opt = distsgd.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
for _ in range(3):
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    opt.zero_grad()
opt.finish()
total = torch.ones(1)
dist.all_reduce(total)  # the user's group is still theirs
print(f"rank {dist.get_rank()}: group alive, sum {total.item():g}")
dist.destroy_process_group()
"""


@pytest.mark.processes
def test_finish_leaves_the_users_process_group(tmp_path: Path) -> None:
    script = tmp_path / "user_group.py"
    script.write_text(USER_GROUP)
    done = torchrun(2, [str(script)])
    assert done.returncode == 0, done.stdout[-3000:]
    # Two ranks share one stdout pipe, so their lines can run together: match the records,
    # not the lines.
    assert sorted(re.findall(r"rank \d: group alive, sum \d+", done.stdout)) == [
        "rank 0: group alive, sum 2", "rank 1: group alive, sum 2"]


@pytest.mark.processes
def test_user_loop_example_under_torchrun_with_a_scheduler_and_sharding() -> None:
    pytest.importorskip("sklearn")
    done = torchrun(2, ["examples/user_loop.py", "--epochs", "2"])
    assert done.returncode == 0, done.stdout[-3000:]
    lines = [line for line in done.stdout.splitlines() if not line.startswith(("W", "E"))]
    assert lines[0] == "allreduce: 2 workers, 750 samples an epoch each", done.stdout[-3000:]
    assert [line.split(",")[0] for line in lines[1:]] == ["epoch 1: lr 0.1000",
                                                         "epoch 2: lr 0.0500"]
    assert "Traceback" not in done.stdout


def test_user_loop_example_in_a_world_of_one() -> None:
    pytest.importorskip("sklearn")
    done = run([PYTHON, "examples/user_loop.py", "--algorithm", "ssp", "--epochs", "2"])
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert lines[0] == "ssp: 1 workers, 1500 samples an epoch each"
    assert [line.split(",")[0] for line in lines[1:]] == ["epoch 1: lr 0.1000",
                                                         "epoch 2: lr 0.0500"]


@pytest.mark.processes
def test_torchrun_workers_default_to_the_world_less_the_servers(tmp_path: Path) -> None:
    """ssp on 3 processes: 2 workers and 1 server without --workers; one summary, printed by
    the first worker, and no other rank's line."""
    done = torchrun(3, ["-m", "distsgd", "train", "--algorithm", "ssp", "--steps", "2",
                        "--eval-every", "2", "--out", str(tmp_path / "run")])
    assert done.returncode == 0, done.stdout[-3000:]
    assert done.stdout.count("distsgd ssp") == 1 and "stopped after" not in done.stdout
    assert "  2 workers, backend torchrun" in done.stdout


@pytest.mark.processes
def test_torchrun_workers_mismatch_is_one_line(tmp_path: Path) -> None:
    done = torchrun(2, ["-m", "distsgd", "train", "--algorithm", "ssp", "--workers", "2",
                        "--steps", "2", "--out", str(tmp_path / "run")])
    assert done.returncode != 0
    error = ("distsgd: error: torchrun started 2 processes but --workers 2 with ssp needs 3; "
             "valid: --workers 1 (the default)")
    assert done.stdout.count(error) == 2, done.stdout[-3000:]  # once per rank
    assert "distsgd-mailbox" not in done.stdout and "[rank" not in done.stdout
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------- helpers
def run(cmd: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=False, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)


def torchrun(processes: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    return run([TORCHRUN, "--standalone", "--nproc-per-node", str(processes), *args])


# ------------------------------------------------------------------- torchrun: folders, resume
def test_train_under_torchrun_defaults_workers_to_the_world_less_the_servers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`distsgd.train(backend="torchrun")` takes --workers' torchrun default, as the CLI does:
    ssp in a job of 3 processes has 2 workers (and 1 server); given workers stay as given."""
    import distsgd.runtime

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    configs: list[distsgd.RunConfig] = []
    monkeypatch.setattr(distsgd.runtime, "run", configs.append)  # the configs runs would get
    distsgd.train(backend="torchrun", algorithm="ssp")
    distsgd.train(backend="torchrun", algorithm="sgp")
    distsgd.train(backend="torchrun", algorithm="ssp", workers=5)
    distsgd.train(backend="sim", algorithm="ssp")
    assert [cfg.workers for cfg in configs] == [2, 3, 5, 4]


@pytest.mark.processes
def test_torchrun_on_a_refused_folder_every_rank_stops_at_once(tmp_path: Path) -> None:
    """An --out holding a run is refused on the rank that takes the folder; the other rank hears
    it and stops with a line of its own, rather than wait in the rendezvous until torchrun kills
    it (its agent gives a rank 30 s after SIGTERM, then SIGKILLs it)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    done = torchrun(2, ["-m", "distsgd", "train", "-a", "allreduce", "--steps", "2",
                        "--timeout", "600", "--out", str(out)])
    assert done.returncode != 0
    refused = f"distsgd: error: out {str(out)!r} already holds a run (its config.json)"
    assert done.stdout.count(refused) == 1, done.stdout[-3000:]
    assert done.stdout.count("distsgd: error: not started: rank 0 could not take the run "
                             "folder (its own line says why)") == 1, done.stdout[-3000:]
    assert "forcefully" not in done.stdout and "SIGKILL" not in done.stdout
    assert f'File "{ROOT / "distsgd"}' not in done.stdout  # no rank's traceback (torchrun's own
    # report of the failed ranks follows)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.processes
def test_torchrun_stop_after_prints_a_resume_command_that_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """--stop-after under torchrun: the command printed continues the run (run here, as
    printed), which ends as a whole run does; outside torchrun, --resume names that command."""
    import shlex

    from distsgd import cli

    out = tmp_path / "run"
    stopped = torchrun(2, ["-m", "distsgd", "train", "-a", "allreduce", "--steps", "8",
                           "--eval-every", "2", "--checkpoint-every", "4", "--stop-after", "4",
                           "--no-progress", "--out", str(out)])
    assert stopped.returncode == 0, stopped.stdout[-3000:]
    lines = [line for line in stopped.stdout.splitlines() if "continue with: " in line]
    assert len(lines) == 1, stopped.stdout[-3000:]  # the first worker's; the other prints none
    hint = lines[0].split("continue with: ")[1]
    assert hint == (f"torchrun --standalone --nproc-per-node 2 -m distsgd train --resume "
                    f"{shlex.quote(str(out))}")
    assert cli.main(["train", "--resume", str(out)]) == 2  # not under torchrun: refused
    assert capsys.readouterr().err.strip().endswith(f"resume it with {hint}")
    resumed = run([TORCHRUN, *shlex.split(hint)[1:]])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert resumed.stdout.count("distsgd allreduce") == 1, resumed.stdout[-3000:]
    assert [line["step"] for line in distsgd.metrics.read_metrics(out)] == [0, 2, 4, 6, 8]
    assert distsgd.metrics.read_summary(out)["steps"] == 8


def test_a_torchrun_run_resumed_by_a_job_of_another_size_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job's size is the run's: another is refused before joining, naming the command
    that fits; a job over several machines is told to use its own torchrun options."""
    from distsgd import torchrun_job

    for name, value in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3",
                        "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    cfg = distsgd.RunConfig(algorithm="sgp", workers=2, backend="torchrun", out="runs/a b")
    with pytest.raises(distsgd.UsageError) as refused:
        torchrun_job.check_world(cfg, resuming=True)
    assert str(refused.value) == (
        "torchrun started 3 processes but --workers 2 with sgp needs 2; valid: the run's 2 "
        "processes (torchrun --standalone --nproc-per-node 2 -m distsgd train --resume "
        "'runs/a b')")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert torchrun_job.resume_command("runs/a", cfg) == (
        "on every machine, torchrun with the job's options and -m distsgd train --resume runs/a")
    assert torchrun_job.resume_command("runs/a", distsgd.RunConfig()) == (
        "distsgd train --resume runs/a")
