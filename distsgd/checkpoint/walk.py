"""An algorithm's state as plain data and back: the generic walk behind `Algorithm.state_dict`.

`capture` / `restore` walk dataclasses, tensors, numbers, containers, numpy generators, and objects
that define ``checkpoint_state`` / ``restore_checkpoint_state``, so most algorithms need no code of
their own (docs/checkpoints.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from distsgd.comm.base import Group
from distsgd.errors import CheckpointError

_GENERATOR = "numpy_generator"


def capture(value: Any) -> Any:
    """A copy of `value` made of tensors, numbers, strings and containers only."""
    if isinstance(value, torch.Tensor):  # on the CPU: a checkpoint loads on any machine
        return value.detach().cpu().clone()
    if isinstance(value, np.random.Generator):
        return {_GENERATOR: value.bit_generator.state}
    if hasattr(value, "checkpoint_state"):
        return value.checkpoint_state()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Groups are structure, rebuilt by the algorithm's init on every rank: not state.
        return {f.name: capture(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not isinstance(getattr(value, f.name), Group)}
    if isinstance(value, dict):
        return {k: capture(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(capture(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return set(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__}: give it checkpoint_state() and "
                    "restore_checkpoint_state(), or override the algorithm's state_dict")


def restore(current: Any, saved: Any) -> Any:
    """`current` with the values of `saved` (from `capture`); returns the restored object."""
    if isinstance(current, np.random.Generator):
        current.bit_generator.state = saved[_GENERATOR]
        return current
    if isinstance(saved, torch.Tensor):  # back onto the device of the tensor it replaces
        device = current.device if isinstance(current, torch.Tensor) else saved.device
        return saved.to(device, copy=True)
    if hasattr(current, "restore_checkpoint_state"):
        current.restore_checkpoint_state(saved)
        return current
    if dataclasses.is_dataclass(current) and not isinstance(current, type):
        return _restore_fields(current, saved)
    if isinstance(saved, dict):
        old = current if isinstance(current, dict) else {}
        return {k: restore(old.get(k), v) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        before = list(current) if isinstance(current, (list, tuple)) else []
        before += [None] * (len(saved) - len(before))
        items = [restore(c, s) for c, s in zip(before, saved, strict=False)]
        return tuple(items) if isinstance(current, tuple) else items
    if isinstance(saved, set):
        return set(saved)
    return saved


def _restore_fields(current: Any, saved: Any) -> Any:
    # A saved field the state no longer has would be set as a stray attribute while the field
    # that replaced it kept its initial value: a resumed run that silently differs. Refuse it.
    names = {f.name for f in dataclasses.fields(current)}
    unknown = sorted(set(saved) - names) if isinstance(saved, dict) else ["(not a dict)"]
    if unknown:
        raise CheckpointError(f"a checkpoint's {type(current).__name__} has field "
                              f"{unknown[0]!r}; valid fields: {', '.join(sorted(names))}")
    for name, value in saved.items():
        setattr(current, name, restore(getattr(current, name), value))
    return current
