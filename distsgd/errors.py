"""The errors distsgd raises on purpose; the CLI turns `UsageError` into exit status 2."""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Iterable
from typing import Any


class DistSGDError(Exception):
    """Base class of every error distsgd raises deliberately."""


class UsageError(DistSGDError, ValueError):
    """Bad input from the user: an unknown name, a value out of range, missing data.

    The message names the problem and the valid choices; the CLI prints it and exits with status 2.
    """


class CommTimeout(DistSGDError, TimeoutError):
    """A blocking communication verb waited longer than its timeout."""


class DeadlockError(DistSGDError, RuntimeError):
    """The simulator found every live worker blocked; the message names each worker's state."""


class WorkerFailure(DistSGDError, RuntimeError):
    """A worker (process or simulated thread) failed; the message names the rank and the cause."""


class DivergenceError(WorkerFailure):
    """A worker's loss or model became non-finite; the message names the worker and the step."""


class PeerDied(WorkerFailure):
    """A verb involved a peer that died in a run that carries on without it (--on-failure
    continue); `rank` is the dead peer's global rank, so algorithms can route around it."""

    def __init__(self, message: str, rank: int = -1) -> None:
        super().__init__(message)
        self.rank = rank


class ProtocolError(DistSGDError, ValueError):
    """A message arrived that breaks the wire protocol (bad header, kind, size or dtype); the
    message names the sender. Nothing received is ever unpickled, so this is the worst it gets."""


def check_type(name: str, value: object, hint: Any) -> None:
    """Raise `UsageError` when `value` does not have the declared type `hint`.

    int and float accept no bool; float accepts an int; tuples are checked element by element
    (``tuple[X, ...]`` and fixed ``tuple[A, B]``); other containers only by their own type.
    """
    if not _matches(value, hint):
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds = " or ".join("none" if o is type(None) else _describe(o) for o in options)
        raise UsageError(f"{name}={value!r} is not a valid {kinds}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "tuple " + str(hint).removeprefix("tuple")
    return getattr(hint, "__name__", str(hint))


def _matches(value: object, hint: Any) -> bool:
    if isinstance(hint, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(map(_matches, value, args))
    kind = origin or hint
    return isinstance(kind, type) and isinstance(value, kind)


def check_range(
    name: str, value: float, low: float | None = None, high: float | None = None,
    *, low_open: bool = False, high_open: bool = False, meaning: str = "", finite: bool = False,
) -> None:
    """Raise `UsageError` naming `name` and its valid range when `value` falls outside it.

    NaN is always out of range; with `finite`, so are the infinities (an unbounded side, None,
    otherwise admits them: `comm.close(math.inf)` means no limit).
    """
    real = isinstance(value, float)  # math.isnan(10**400) would raise OverflowError
    bad = (
        (real and math.isnan(value))
        or (finite and real and math.isinf(value))
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if bad:
        lo = "-inf" if low is None else _bound(low)
        hi = "inf" if high is None else _bound(high)
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        why = f" ({meaning})" if meaning else ""
        kind = "finite values" if finite and (low is None or high is None) else "values"
        raise UsageError(f"{name}={value!r} is out of range: valid {kind} lie in "
                         f"{left}{lo}, {hi}{right}{why}")


def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"  # 2**63 - 1 exactly


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest of `choices` to a mistyped `word`, else ""."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class CheckpointError(DistSGDError):
    """A checkpoint cannot be used: missing, corrupt or truncated, or another run's (exit 1)."""


class StorageError(DistSGDError):
    """A run folder, checkpoint or report cannot be written (read-only, full disk, not a folder);
    the message names the path (exit 1)."""
