"""Checkpoints: every piece of a run's state as plain tensors, lists, dicts and numbers.

A checkpoint is one file, ``RUN/checkpoint.pt``; what it holds and when it is taken:
docs/checkpoints.md. The package, one concept a module:

- `walk`: `capture` / `restore`, an algorithm's state object as plain data and back;
- `wire`: `to_bytes` / `from_bytes`, that data between ranks without pickle;
- `files`: `save` / `load` of the file, and the check that it belongs to the folder's run;
- `checks`: every field of a loaded checkpoint type- and range-checked, against its run too;
- `taking`: `Checkpoints`, when a run is checkpointed and who gathers and writes it.
"""

from __future__ import annotations

from distsgd.checkpoint.checks import check_for_run
from distsgd.checkpoint.files import (
    FILE,
    FORMAT,
    NEUTRAL,
    check_same_run,
    comparable,
    keep_metrics_through,
    load,
    save,
)
from distsgd.checkpoint.taking import Checkpoints
from distsgd.checkpoint.walk import capture, restore
from distsgd.checkpoint.wire import from_bytes, to_bytes

__all__ = ["FILE", "FORMAT", "NEUTRAL", "Checkpoints", "capture", "check_for_run",
           "check_same_run", "comparable",
           "from_bytes", "keep_metrics_through", "load", "restore", "save", "to_bytes"]
