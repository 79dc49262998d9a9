"""--device: validated up front, recorded in config.json, and device cpu given explicitly is the
default run bit for bit. Tensors the algorithms create follow the data's device (checked with
torch's storage-less "meta" device, which runs here without a GPU). Nothing here needs CUDA; a
GPU run has not been verified in this project (docs/multi-machine.md, "GPU")."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import distsgd
from distsgd import checkpoint, cli, mixing
from distsgd.config import RunConfig, check_device
from distsgd.errors import UsageError

pytestmark = pytest.mark.timeout(180)


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_usage_error(device: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    with pytest.raises(UsageError) as e:
        RunConfig.create(device=device, steps=3)
    assert str(e.value) == (f"device {device!r} is not available; valid choices: cpu "
                            "(torch sees no CUDA GPU)")


def test_cli_device_cuda_without_a_gpu_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    _no_cuda(monkeypatch)
    out = tmp_path / "never"
    code = cli.main(["train", "--device", "cuda", "--steps", "3", "--out", str(out),
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("distsgd: error: device 'cuda' is not available; valid choices: cpu "
                   "(torch sees no CUDA GPU)\n")
    assert not out.exists()


@pytest.mark.parametrize("device, backend, message", [
    ("gpu", "sim", "device 'gpu' is not available; valid choices: cpu, cuda, cuda:0..cuda:1"),
    ("cuda:2", "sim", "device 'cuda:2' is not available; valid choices: cpu, cuda, "
                      "cuda:0..cuda:1"),
    ("cuda:-1", "sim", "device 'cuda:-1' is not available"),
    ("cuda:", "sim", "device 'cuda:' is not available"),
    ("cuda:1", "processes", "device 'cuda:1' is for the simulator; real processes take device "
                            "'cuda' (each process its own GPU); valid: cpu, cuda"),
])
def test_bad_devices_name_the_valid_choices(device: str, backend: str, message: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _two_gpus(monkeypatch)  # only torch's answers are faked: nothing touches a GPU
    with pytest.raises(UsageError, match="^" + re.escape(message)):
        check_device(device, backend)


@pytest.mark.parametrize("device, backend", [
    ("cpu", "sim"), ("cpu", "processes"), ("cuda", "sim"), ("cuda:1", "sim"),
    ("cuda", "processes"), ("cuda", "torchrun"),
])
def test_valid_devices_pass(device: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _two_gpus(monkeypatch)
    check_device(device, backend)


@pytest.mark.parametrize("algorithm", ["allreduce", "gosgd"])  # one sync, one async
def test_explicit_cpu_is_the_default_bit_for_bit(algorithm: str, tmp_path: Path) -> None:
    options = dict(algorithm=algorithm, workers=3, steps=12, eval_every=6, model="mlp",
                   backend="sim")
    a = distsgd.train(**options, out=str(tmp_path / "default"))
    b = distsgd.train(**options, device="cpu", out=str(tmp_path / "cpu"))
    for x, y in zip(a.workers, b.workers, strict=True):
        assert x.state.device.type == "cpu"
        assert torch.equal(x.state, y.state)
    strip = [{k: v for k, v in r.items() if k != "real_time_s"} for r in a.metrics]
    assert strip == [{k: v for k, v in r.items() if k != "real_time_s"} for r in b.metrics]
    config = json.loads((tmp_path / "cpu" / "config.json").read_text())
    assert config["device"] == "cpu"


def test_created_tensors_follow_the_datas_device() -> None:
    meta = torch.device("meta")
    packed = mixing.pack_weight(1 / 3, torch.float32, meta)
    assert packed.device == meta and packed.dtype == torch.float32 and packed.numel() == 2
    indices = torch.tensor([0, 2], device=meta)
    dense = mixing.densify(indices, torch.ones(2, device=meta), 5)
    assert dense.device == meta and dense.shape == (5,)


def test_checkpoints_hold_cpu_tensors_and_restore_onto_the_current_device() -> None:
    saved = checkpoint.capture({"x": torch.arange(4.0)})
    assert saved["x"].device.type == "cpu"
    restored = checkpoint.restore({"x": torch.empty(4, device="meta")}, saved)
    assert restored["x"].device.type == "meta"  # onto the device of the tensor it replaces
    again = checkpoint.restore({"x": torch.zeros(4)}, saved)
    assert torch.equal(again["x"], torch.arange(4.0)) and again["x"] is not saved["x"]
