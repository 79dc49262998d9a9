"""Fault injection for tests and drills: ``DISTSGD_KILL=RANK:STEP[,RANK:STEP...]`` makes global
rank RANK SIGKILL itself right after it reports step STEP (docs/failures.md).

Why the library still knows of it: the kill must reach unmodified runs, ``distsgd train
--backend processes`` started as a subprocess or ``distsgd.train(backend="processes")``, where no
test code is loaded, so the only channel is the environment, and whoever starts the workers has
to read it. The local launcher (`distsgd.launch.launch`) therefore asks `from_environment` for a
per-step hook before it starts anything (a malformed value is a `UsageError` then) and calls the
hook in each worker after every step it notes; that hook-up is all the library holds. The hook is
a picklable value (it travels to spawned workers), and everything about faults lives here.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from distsgd.errors import UsageError

KILL_VARIABLE = "DISTSGD_KILL"


def parse_kill(text: str, world_size: int) -> tuple[tuple[int, int], ...]:
    """``RANK:STEP[,RANK:STEP]`` (the `DISTSGD_KILL` variable) as (rank, step) pairs."""
    out = []
    for item in filter(None, text.split(",")):
        rank, sep, step = item.partition(":")
        try:
            pair = (int(rank), int(step))
        except ValueError:
            pair = (-1, -1)
        if not sep or not 0 <= pair[0] < world_size or pair[1] < 0:
            raise UsageError(f"{KILL_VARIABLE}={text!r}: {item!r} is not RANK:STEP with RANK in "
                             f"0..{world_size - 1} and STEP >= 0 (e.g. {KILL_VARIABLE}=1:20)")
        out.append(pair)
    return tuple(out)


@dataclass(frozen=True)
class KillAt:
    """A per-step hook: SIGKILL this process once rank `rank` has reported one of its steps."""

    at: tuple[tuple[int, int], ...]  # (rank, step) pairs

    def __call__(self, rank: int, step: int) -> None:
        if (rank, step) in self.at:
            sys.stdout.flush()  # what the rank printed so far is kept, as a crash would not
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def from_environment(env: Mapping[str, str], world_size: int) -> KillAt | None:
    """The hook `env`'s `DISTSGD_KILL` asks for in a world of `world_size` ranks (None: none)."""
    at = parse_kill(env.get(KILL_VARIABLE, ""), world_size)
    return KillAt(at) if at else None
