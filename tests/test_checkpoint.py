"""Checkpoint and resume (docs/checkpoints.md): bit-identical in the simulator for every algorithm,
within a stated tolerance on real processes, and clear errors that change nothing on bad input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import distsgd
from distsgd import checkpoint, cli, mixing
from distsgd.algorithms import REGISTRY
from distsgd.comm.sim import SimWorld
from distsgd.errors import CheckpointError, StorageError, UsageError
from distsgd.runtime import RunResult

pytestmark = pytest.mark.timeout(300)

# A straggler and a seeded random slowdown make the asynchronous schedules uneven, so resuming
# must restore the virtual clocks, the jitter streams and the messages in flight to match.
RUN = dict(workers=4, dataset="digits", model="mlp", steps=12, eval_every=4, seed=1,
           slowdown="lognormal:0.3", stragglers=((1, 2.0),))


def _metrics(result: RunResult) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k != "real_time_s"} for m in result.metrics]


def _summary(result: RunResult) -> dict[str, Any]:
    return {k: v for k, v in result.summary.items() if k not in ("real_time_s", "startup_s")}


def _assert_identical(a: RunResult, b: RunResult) -> None:
    assert len(a.workers) == len(b.workers)
    for x, y in zip(a.workers, b.workers, strict=True):
        assert torch.equal(x.state, y.state), f"rank {x.rank}: parameters differ"
        assert x.bytes_by_verb == y.bytes_by_verb and x.virtual_time_s == y.virtual_time_s
        assert x.steps == y.steps
    assert _metrics(a) == _metrics(b)
    assert _summary(a) == _summary(b)


@pytest.mark.parametrize("algorithm", sorted(REGISTRY))
def test_stopped_and_resumed_run_is_bit_identical(algorithm: str, tmp_path: Path) -> None:
    checkpointed = distsgd.train(algorithm=algorithm, **RUN, checkpoint_every=4,
                                 out=str(tmp_path / "straight"))
    stopped = distsgd.train(algorithm=algorithm, **RUN, checkpoint_every=4, stop_after=8,
                            out=str(tmp_path / "resumed"))
    assert stopped.summary == {} and stopped.stopped_at == 8
    assert [m["step"] for m in stopped.metrics] == [0, 4, 8]
    resumed = distsgd.resume(str(tmp_path / "resumed"))
    # Every worker's parameters bit for bit, and every metrics field (virtual time, bytes,
    # staleness, consensus distance) except the real time.
    _assert_identical(checkpointed, resumed)
    if algorithm not in ("gosgd", "adpsgd"):  # only gossip can have messages on their way
        saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
        assert all(rank["inbox"] == [] for rank in saved["world"]["ranks"])
    if REGISTRY[algorithm].synchronous:
        # A synchronous run is checkpointed at a step boundary every worker reaches anyway:
        # taking checkpoints does not change it at all.
        plain = distsgd.train(algorithm=algorithm, **RUN, out=str(tmp_path / "plain"))
        _assert_identical(plain, checkpointed)


def test_checkpoint_holds_every_piece_of_state(tmp_path: Path) -> None:
    distsgd.train(algorithm="ssp", **RUN, checkpoint_every=4, stop_after=4, out=str(tmp_path))
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain data only
    assert saved["format"] == checkpoint.FORMAT and saved["step"] == 4
    assert saved["config"]["algorithm"] == "ssp" and saved["config"]["hyperparameters"]["s"] == 3
    assert saved["observer"] == {"taken": 16}  # global progress: 4 workers x 4 steps
    workers = saved["workers"]
    assert len(workers) == 4 and sum(w["step"] for w in workers) == 16
    assert all(w["algorithm"]["client"]["versions"][0] > 0 for w in workers)
    assert all(len(w["model"]) == 6 and w["model"]["1.weight"].dtype == torch.float32
               for w in workers)
    assert all(w["torch_rng"].dtype == torch.uint8 and "state" in w["jitter"] for w in workers)
    (server,) = saved["servers"]
    assert server["shard"]["version"] == 16  # one version per applied push
    assert sum(server["shard"]["staleness"]) == 16 and server["shard"]["live"] == {1, 2, 3, 4}
    world = saved["world"]["ranks"]
    assert len(world) == 5 and all(r["clock"] > 0 for r in world)
    assert all(r["inbox"] == [] for r in world)  # quiescent: the server answered every pull
    assert saved["evaluator"]["loss_count"] > 0


def test_gossip_messages_in_flight_are_part_of_the_checkpoint(tmp_path: Path) -> None:
    options = dict(RUN, hyperparameters={"p": 1.0})
    straight = distsgd.train(algorithm="gosgd", **options, checkpoint_every=4,
                             out=str(tmp_path / "a"))
    saved = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    in_flight = [m for r in saved["world"]["ranks"] for m in r["inbox"]]
    assert in_flight, "with p = 1 some push is on its way at the checkpoint"
    # The push-sum invariant across the cut: the weights held plus those in flight sum to 1.
    held = sum(w["algorithm"]["weight"] for w in saved["workers"])
    slots = mixing.weight_slots(torch.float32)
    flying = sum(mixing.unpack_weight(p[-slots:]) for _, _, _, p in in_flight)
    assert held + flying == 1.0
    # A run that died after its last checkpoint (step 8) resumes from it: the lines it wrote
    # past step 8 are dropped, then written again identically.
    copy = tmp_path / "b"
    shutil.copytree(tmp_path / "a", copy)
    with (copy / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "half a line')  # as a run killed while writing would leave it
    _assert_identical(straight, distsgd.resume(str(copy)))


def test_ssp_workers_blocked_by_a_parked_one_step_on_until_all_can_park(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # s = 1 and a slow worker: a fast worker's pull can wait for the slow one's next push, so
    # parking everyone at exactly 4 x 4 steps is impossible; they go on a step and retry.
    attempts: list[bool] = []
    hold = SimWorld.hold

    def counted(world: SimWorld, *args: Any) -> bool:
        attempts.append(hold(world, *args))
        return attempts[-1]

    monkeypatch.setattr(SimWorld, "hold", counted)
    options = dict(RUN, hyperparameters={"s": 1.0}, stragglers=((1, 5.0),))
    straight = distsgd.train(algorithm="ssp", **options, checkpoint_every=4,
                             out=str(tmp_path / "a"))
    assert False in attempts and attempts.count(True) == 2 * 4  # two checkpoints, 4 workers
    saved = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 8 and saved["observer"]["taken"] > 4 * 8
    distsgd.train(algorithm="ssp", **options, checkpoint_every=4, stop_after=8,
                  out=str(tmp_path / "b"))
    _assert_identical(straight, distsgd.resume(str(tmp_path / "b")))


def test_resume_can_stop_again_and_go_on(tmp_path: Path) -> None:
    full = distsgd.train(algorithm="easgd-async", **RUN, checkpoint_every=4,
                         out=str(tmp_path / "a"))
    distsgd.train(algorithm="easgd-async", **RUN, checkpoint_every=4, stop_after=4,
                  out=str(tmp_path / "b"))
    again = distsgd.resume(str(tmp_path / "b"), stop_after=8)
    assert again.stopped_at == 8 and [m["step"] for m in again.metrics] == [0, 4, 8]
    _assert_identical(full, distsgd.resume(str(tmp_path / "b")))


# ------------------------------------------------------------------------- the file
def test_state_walk_round_trips_generators_sets_and_nested_dataclasses() -> None:
    rng = np.random.default_rng(7)
    rng.random(3)
    state = {"rng": rng, "live": {1, 2}, "pair": (torch.ones(2), 3.5), "n": None}
    saved = checkpoint.from_bytes(checkpoint.to_bytes(checkpoint.capture(state)))
    expected = rng.random(4)
    other = {"rng": np.random.default_rng(0), "live": set(), "pair": (torch.zeros(2), 0.0),
             "n": 1}
    restored = checkpoint.restore(other, saved)
    assert np.array_equal(restored["rng"].random(4), expected)
    assert restored["live"] == {1, 2} and restored["n"] is None
    assert isinstance(restored["pair"], tuple) and torch.equal(restored["pair"][0], torch.ones(2))


def test_restoring_a_field_the_state_does_not_have_is_an_error() -> None:
    # E.g. a parameter-server client's state from before its `extra` became a typed field: set as
    # a stray attribute, it would leave the real field at its initial value without a word.
    @dataclasses.dataclass
    class Elastic:
        anchor: torch.Tensor
        momentum: torch.Tensor

    state = Elastic(torch.zeros(2), torch.zeros(2))
    with pytest.raises(CheckpointError, match="Elastic has field 'extra'; valid fields: "
                                              "anchor, momentum"):
        checkpoint.restore(state, {"anchor": torch.ones(2), "extra": torch.ones(2)})
    restored = checkpoint.restore(state, checkpoint.capture(Elastic(torch.ones(2),
                                                                    torch.full((2,), 3.0))))
    assert torch.equal(restored.momentum, torch.full((2,), 3.0))


@pytest.mark.parametrize("damage", ["short", "truncated", "padded", "deep", "bad-dtype"])
def test_a_malformed_checkpoint_message_is_an_error_not_unpickled(damage: str) -> None:
    # What real processes send each other at a checkpoint: JSON and raw tensor bytes, no pickle.
    blob = checkpoint.to_bytes({"x": torch.arange(4.0), "clocks": {1: 2.0}})
    skeleton = b'{"l": [' * 10_000
    if damage == "bad-dtype":
        skeleton = json.dumps({"t": ["object", [1]]}).encode()
    if damage in ("deep", "bad-dtype"):
        blob = torch.tensor(list(len(skeleton).to_bytes(8, "little")) + list(skeleton),
                            dtype=torch.uint8)
    blob = {"short": blob[:5], "truncated": blob[:-1],
            "padded": torch.cat([blob, torch.zeros(4, dtype=torch.uint8)])}.get(damage, blob)
    with pytest.raises(CheckpointError, match="checkpoint message"):
        checkpoint.from_bytes(blob)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint.save(tmp_path, {"step": 1})

    def dies_halfway(obj: Any, f: Any) -> None:
        f.write(b"half a checkpoint")  # what a writer that dies halfway leaves
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(StorageError, match=r"cannot write .*checkpoint\.pt: disk full"):
        checkpoint.save(tmp_path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


# ------------------------------------------------------------------------ bad input
def _folder_bytes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stopped")
    small = dict(workers=2, model="mlp", steps=4, eval_every=2, checkpoint_every=2, stop_after=2)
    distsgd.train(algorithm="allreduce", **small, out=str(root / "allreduce"))
    distsgd.train(algorithm="local-sgd", **small, out=str(root / "local-sgd"))
    distsgd.train(algorithm="allreduce", **small, lr=0.1, out=str(root / "other-lr"))
    return root


def _damage(root: Path, case: str, tmp_path: Path) -> Path:
    run = tmp_path / case
    shutil.copytree(root / "allreduce", run)
    ckpt = run / "checkpoint.pt"
    if case == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif case == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    elif case == "other-algorithm":
        shutil.copy(root / "local-sgd" / "checkpoint.pt", ckpt)
    elif case == "other-config":
        shutil.copy(root / "other-lr" / "checkpoint.pt", ckpt)
    elif case == "missing":
        ckpt.unlink()
    elif case == "not-a-run":
        (run / "config.json").unlink()
    elif case == "old-format":
        saved = torch.load(ckpt, weights_only=True)
        torch.save({**saved, "format": 99}, ckpt)
    return run


@pytest.mark.parametrize("case, words", [
    ("truncated", "corrupt or truncated"), ("garbage", "corrupt or truncated"),
    ("other-algorithm", "belongs to another run: its algorithm is 'local-sgd'"),
    ("other-config", "belongs to another run: its lr is 0.1"),
    ("missing", "has no checkpoint.pt"), ("not-a-run", "is not a run folder"),
    ("old-format", "has format 99"),
])
def test_a_bad_checkpoint_is_one_clear_error_and_changes_nothing(
        stopped_runs: Path, tmp_path: Path, case: str, words: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = _damage(stopped_runs, case, tmp_path)
    before = _folder_bytes(run)
    assert cli.main(["train", "--resume", str(run)]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert _folder_bytes(run) == before
    with pytest.raises(CheckpointError, match=words.split(":")[0]):
        distsgd.resume(str(run))


def test_the_cli_refuses_options_that_would_change_a_resumed_run(stopped_runs: Path) -> None:
    run = stopped_runs / "allreduce"
    before = _folder_bytes(run)
    proc = subprocess.run([sys.executable, "-m", "distsgd", "train", "--resume", str(run),
                           "--lr", "0.3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "distsgd: error: --lr cannot be given with --resume (the run's options come from "
        "RUN_DIR); valid options with --resume: --progress, --stop-after")
    assert _folder_bytes(run) == before


@pytest.mark.parametrize("options, words", [
    (dict(checkpoint_every=-1), "checkpoint_every=-1 is out of range"),
    (dict(stop_after=4), "stop_after needs checkpoint_every > 0"),
    (dict(checkpoint_every=4, stop_after=6), "stop_after=6 is not a checkpoint step"),
    (dict(checkpoint_every=4, stop_after=12), "stop_after=12 is not a checkpoint step of a run"),
    (dict(checkpoint_every=4, algorithm="gosgd", backend="processes"),
     "gosgd on real processes cannot be checkpointed"),
    (dict(checkpoint_every=4, algorithm="gosgd", on_failure="continue"),
     "cannot be combined with on_failure 'continue'"),
])
def test_bad_checkpoint_options_are_usage_errors(options: dict[str, Any], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        distsgd.RunConfig.create(**{"steps": 12, **options})


def test_resume_refuses_a_stop_before_its_checkpoint(stopped_runs: Path) -> None:
    with pytest.raises(UsageError, match="stop_after=2 is not a checkpoint step after"):
        distsgd.resume(str(stopped_runs / "allreduce"), stop_after=2)


# -------------------------------------------------------------------- real processes
PROCESSES = dict(workers=2, dataset="digits", model="mlp", steps=12, eval_every=6, seed=2,
                 timeout=60)


@pytest.mark.processes
def test_allreduce_resumed_on_processes_matches_the_straight_run(tmp_path: Path) -> None:
    reference = distsgd.train(algorithm="allreduce", **PROCESSES, out=str(tmp_path / "sim"))
    distsgd.train(algorithm="allreduce", **PROCESSES, backend="processes", checkpoint_every=6,
                  stop_after=6, out=str(tmp_path / "real"))
    resumed = distsgd.resume(str(tmp_path / "real"))
    for s, r in zip(reference.workers, resumed.workers, strict=True):
        # Same batches, same arithmetic; only gloo's all-reduce may sum in another order than the
        # simulator (float32 rounding), as in test_processes' parity test.
        torch.testing.assert_close(r.state, s.state, atol=1e-5, rtol=1e-4)
        assert r.bytes_by_verb == s.bytes_by_verb  # counting went on from the checkpoint
    assert [m["step"] for m in resumed.metrics] == [0, 6, 12]
    assert [m["train_loss"] for m in resumed.metrics[1:]] == pytest.approx(
        [m["train_loss"] for m in reference.metrics[1:]], rel=1e-5)


@pytest.mark.processes
def test_downpour_resumed_on_processes_keeps_the_server_state(tmp_path: Path) -> None:
    reference = distsgd.train(algorithm="downpour", **PROCESSES, out=str(tmp_path / "sim"))
    distsgd.train(algorithm="downpour", **PROCESSES, backend="processes", checkpoint_every=6,
                  stop_after=6, out=str(tmp_path / "real"))
    saved = torch.load(tmp_path / "real" / "checkpoint.pt", weights_only=True)
    assert saved["servers"][0]["shard"]["version"] == 12  # 2 workers x 6 pushes, fetched by message
    resumed = distsgd.resume(str(tmp_path / "real"))
    # The server went on from its version and histogram: 24 pushes counted in all.
    assert sum(resumed.summary["staleness_histogram"]) == 24
    # Byte counting went on from the checkpoint: steps 6-12 sent what steps 0-6 sent (the same
    # pushes and pulls) on top of what the start sent (the initial broadcast and pull).
    sent = [m["bytes_sent"] for m in resumed.metrics]
    assert sent[2] - sent[1] == sent[1] - sent[0] > 0
    for s, r in zip(reference.workers[1:], resumed.workers[1:], strict=True):
        # Asynchronous: which server version each gradient was taken at depends on process
        # timing (staleness 0 or 1 here), in the straight run as much as in the resumed one. Each
        # of the 24 updates moves x by about lr x |g| ~ 1e-3 per entry; taking a gradient one
        # update staler changes it by far less, so 1e-2 bounds any interleaving with margin
        # (measured: 7e-4), while a lost or repeated update of the server would exceed it.
        torch.testing.assert_close(r.state, s.state, atol=1e-2, rtol=0)
    assert json.loads((tmp_path / "real" / "summary.json").read_text())["steps"] == 12
