"""Whether a loaded checkpoint can be resumed: every field the resumed run reads, type- and
range-checked before anything in the run folder changes.

`check_shape` needs only the file (`files.load` calls it); `check_for_run` needs the run it
resumes: its config, its length in steps and its model (`runtime.resume` calls it). Either
raises `CheckpointError` naming the file, the field and what it should hold.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distsgd.errors import CheckpointError

if TYPE_CHECKING:
    from distsgd.config import RunConfig

# A worker's part: what `train._Worker.restore` and `DistributedOptimizer.load_state_dict` read.
WORKER_KEYS = ("model", "optimizer", "step", "algorithm", "jitter", "torch_rng", "loss_sum",
               "loss_count", "bytes_by_verb")
EVALUATOR_KEYS = ("loss_sum", "loss_count", "real_time_s")
# Optional: checkpoints written before start-up was measured lack them, and still resume.
EVALUATOR_OPTIONAL_KEYS = ("startup_s",)


def check_shape(saved: dict[str, Any], path: Path) -> None:
    """The fields of a checkpoint file, each of its type and in its range."""
    from distsgd.config import MAX_STEPS

    def bad(field: str, value: Any, valid: str) -> CheckpointError:
        return CheckpointError(f"{path} is damaged: its {field} is {_short(value)}; valid: "
                               f"{valid}")

    if not isinstance(saved["config"], dict):
        raise bad("config", saved["config"], "a dict of run options")
    step = saved["step"]
    if not _whole(step) or not 1 <= step <= MAX_STEPS:
        raise bad("step", step, f"a whole number in [1, {MAX_STEPS}]")
    # Not bounded by `step`: an asynchronous simulated run may have evaluated a little past
    # its checkpoint's step before every worker parked there.
    if not _whole(saved["metrics_step"]) or not 0 <= saved["metrics_step"] <= MAX_STEPS:
        raise bad("metrics_step", saved["metrics_step"], f"a whole number in [0, {MAX_STEPS}]")
    for name in ("workers", "servers"):
        parts = saved[name]
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise bad(name, parts, "a list of dicts, one per rank")
    if not saved["workers"]:
        raise bad("workers", saved["workers"], "one state per training worker")
    for index, part in enumerate(saved["workers"]):
        _check_worker(part, f"worker {index}'s", bad, MAX_STEPS)
    if saved["world"] is not None and not isinstance(saved["world"], dict):
        raise bad("world", saved["world"], "a dict (simulated runs) or None")
    if not isinstance(saved.get("observer", {}), dict):
        raise bad("observer", saved["observer"], "a dict")
    evaluator = saved["evaluator"]
    if not isinstance(evaluator, dict) or any(k not in evaluator for k in EVALUATOR_KEYS):
        raise bad("evaluator", evaluator, f"a dict with {', '.join(EVALUATOR_KEYS)}")
    if not _count(evaluator["loss_count"]):
        raise bad("evaluator loss_count", evaluator["loss_count"], "a whole number >= 0")
    for key in ("loss_sum", "real_time_s", *(k for k in EVALUATOR_OPTIONAL_KEYS if k in evaluator)):
        if not _finite(evaluator[key]) or evaluator[key] < 0:
            raise bad(f"evaluator {key}", evaluator[key], "a finite number >= 0")


def _check_worker(part: dict[str, Any], who: str, bad: Any, max_steps: int) -> None:
    missing = [k for k in WORKER_KEYS if k not in part]
    if missing:
        raise bad(f"{who} state", sorted(part), "a dict with " + ", ".join(WORKER_KEYS))
    if not _whole(part["step"]) or not 0 <= part["step"] <= max_steps:
        raise bad(f"{who} step", part["step"], f"a whole number in [0, {max_steps}]")
    if not _count(part["loss_count"]):
        raise bad(f"{who} loss_count", part["loss_count"], "a whole number >= 0")
    if not _finite(part["loss_sum"]):
        raise bad(f"{who} loss_sum", part["loss_sum"], "a finite number")
    model = part["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise bad(f"{who} model", model, "a dict of named tensors")
    rng = part["torch_rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise bad(f"{who} torch_rng", rng, "a torch generator state (1-D uint8 tensor)")
    jitter = part["jitter"]
    if not isinstance(jitter, dict) or not isinstance(jitter.get("bit_generator"), str):
        raise bad(f"{who} jitter", jitter, "a numpy generator state")
    for key in ("optimizer", "bytes_by_verb"):
        if not isinstance(part[key], dict):
            raise bad(f"{who} {key}", part[key], "a dict")
    if not all(isinstance(k, str) and _count(v) for k, v in part["bytes_by_verb"].items()):
        raise bad(f"{who} bytes_by_verb", part["bytes_by_verb"], "byte counts >= 0 by verb")


def check_for_run(saved: dict[str, Any], cfg: RunConfig, total: int, model: torch.nn.Module,
                  path: Path) -> None:
    """What the checkpoint must hold for the run `cfg` of `total` steps whose (freshly built)
    model is `model`: a checkpoint step of it, one state per worker and server, the model's
    tensors, an optimizer state over its parameters, the simulated world's ranks."""
    step, every = saved["step"], cfg.checkpoint_every
    if not every or step % every or step >= total:
        raise CheckpointError(
            f"{path} is damaged: its step {step} is not a checkpoint step of its run; valid: "
            f"multiples of checkpoint_every={every} below the run's {total} steps")
    roles = cfg.roles()
    for name, want in (("workers", cfg.workers), ("servers", len(roles.servers))):
        if len(saved[name]) != want:
            raise CheckpointError(f"{path} holds {len(saved[name])} states of {name}; its run "
                                  f"has {want} {name} (--workers {cfg.workers} with "
                                  f"{cfg.algorithm})")
    if cfg.backend == "sim":
        _check_world(saved["world"], roles.world_size, path)
    if not cfg.make_algorithm().synchronous and cfg.backend == "sim":
        taken = saved.get("observer", {}).get("taken")
        if not _whole(taken) or not 0 <= taken <= cfg.workers * total:
            raise CheckpointError(f"{path} is damaged: its observer's steps taken are "
                                  f"{_short(taken)}; valid: a whole number in "
                                  f"[0, {cfg.workers * total}]")
    if saved["metrics_step"] > total:
        raise CheckpointError(f"{path} is damaged: its metrics_step {saved['metrics_step']} is "
                              f"past the run's end ({total} steps)")
    # Every worker stops at the checkpoint's step, but in the simulator's asynchronous runs,
    # where the workers share a budget of steps (a fast one takes more).
    budget = not cfg.make_algorithm().synchronous and cfg.backend == "sim"
    for index, part in enumerate(saved["workers"]):
        if part["step"] > cfg.workers * total if budget else part["step"] != step:
            valid = f"at most {cfg.workers * total}" if budget else f"{step}, the checkpoint's"
            raise CheckpointError(f"{path} is damaged: worker {index}'s step is {part['step']}; "
                                  f"valid: {valid}")
        _check_model(part["model"], model.state_dict(),
                     f"{path} is damaged: worker {index}'s model")
        _check_optimizer(part["optimizer"], model, f"{path} is damaged: worker {index}'s "
                         "optimizer state")


def _check_world(world: Any, ranks: int, path: Path) -> None:
    """The simulated world's clocks, NICs and messages in flight (`SimWorld.state_dict`)."""
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is damaged: its simulated world's {what}")

    if not isinstance(world, dict) or not _whole(world.get("seq")):
        raise fail(f"state is {_short(world)}; valid: a dict with seq, host_nics, ranks")
    nics = world.get("host_nics")
    if not (isinstance(nics, (list, tuple)) and len(nics) == 2
            and all(isinstance(n, dict) for n in nics)):
        raise fail(f"host_nics are {_short(nics)}; valid: (egress, ingress) dicts")
    busy = world.get("host_ingress_busy", {})  # absent in older checkpoints
    if not (isinstance(busy, dict) and all(_pairs(v) for v in busy.values())):
        raise fail(f"host_ingress_busy is {_short(busy)}; valid: a dict of (start, end) lists")
    states = world.get("ranks")
    if not isinstance(states, list) or len(states) != ranks:
        raise fail(f"ranks hold {_short(states)}; valid: one state for each of {ranks} ranks")
    for rank, state in enumerate(states):
        ok = isinstance(state, dict) and all(
            _finite(state.get(k)) and state[k] >= 0 for k in ("clock", "nic_free", "ingress_free"))
        ok = ok and isinstance(state.get("bytes_by_verb"), dict) and isinstance(
            state.get("inbox"), list) and all(
            isinstance(m, (list, tuple)) and len(m) == 4 and _finite(m[0]) and _whole(m[1])
            and _whole(m[2]) and 0 <= m[2] < ranks and isinstance(m[3], torch.Tensor)
            for m in state["inbox"])
        # Added later (absent in older checkpoints): the port's busy stretches, the CPU owed.
        debt = state.get("cpu_debt", (0.0, [])) if ok else None
        ok = ok and _pairs(state.get("ingress_busy", [])) and isinstance(debt, (list, tuple)) \
            and len(debt) == 2 and _finite(debt[0]) and debt[0] >= 0 and _pairs(debt[1])
        if not ok:
            raise fail(f"rank {rank} is {_short(state)}; valid: clock, nic_free, ingress_free "
                       ">= 0, bytes_by_verb, inbox, ingress_busy and cpu_debt")


def _pairs(value: Any) -> bool:
    """A list of (a, b) pairs of finite numbers (a port's busy stretches, messages' CPU)."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and _finite(p[0]) and _finite(p[1])
        for p in value)


def _check_optimizer(saved: dict[str, Any], model: torch.nn.Module, who: str) -> None:
    """torch's SGD state over the model's parameters: loaded here into a throwaway optimizer,
    whose own checks (groups, parameter counts) then run before the real one's; a momentum
    buffer must match its parameter."""
    params = list(model.parameters())
    try:
        trial = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        trial.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{who} cannot be loaded ({_short(str(e))})") from None
    for param in params:
        buffer = trial.state.get(param, {}).get("momentum_buffer")
        if buffer is not None and (not isinstance(buffer, torch.Tensor)
                                   or buffer.shape != param.shape):
            raise CheckpointError(f"{who} has a momentum buffer of shape "
                                  f"{tuple(getattr(buffer, 'shape', ()))} for a parameter of "
                                  f"shape {tuple(param.shape)}")


def _check_model(saved: dict[str, torch.Tensor], model: dict[str, torch.Tensor],
                 who: str) -> None:
    if set(saved) != set(model):
        extra = sorted(set(saved) ^ set(model))[0]
        raise CheckpointError(f"{who} does not match the run's {len(model)} tensors (first "
                              f"differing: {extra!r})")
    for name, tensor in model.items():
        got = saved[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise CheckpointError(f"{who} has {name} of shape {tuple(got.shape)} {got.dtype}; "
                                  f"the run's is {tuple(tensor.shape)} {tensor.dtype}")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return _whole(value) and value >= 0


def _finite(value: Any) -> bool:
    return _whole(value) or (isinstance(value, float) and math.isfinite(value))


def _short(value: Any) -> str:
    text = " ".join(repr(value).split())  # one line, whatever the file held
    return text if len(text) <= 60 else text[:57] + "..."
