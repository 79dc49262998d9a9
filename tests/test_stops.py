"""Stopping a command leaves nothing behind (issue 12): SIGINT, SIGTERM or SIGKILL of `distsgd
compare -j 2` ends its cells' processes within seconds and a rerun resumes; SIGTERM to `distsgd
train` is one line, exit 143, no process and no rendezvous folder left.

Processes are found through /proc: every process of the command's own session and group (it is
started with start_new_session), zombies aside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distsgd import cli
from distsgd.metrics import LOCK_FILE

pytestmark = [pytest.mark.timeout(240), pytest.mark.processes]

GONE_WITHIN = 15.0  # seconds: the pool's SIGTERM grace (3 s) and the exits, on a loaded machine
GRID = """
[run]
dataset = "digits"
model = "mlp"
[[grid]]
algorithm = "sgp"
steps = 2
[[grid]]
algorithm = "allreduce"
steps = 1000000
"""
SHORT, LONG = "sgp-w4-steps=2-seed0", "allreduce-w4-steps=1000000-seed0"


def _group(pgid: int) -> list[int]:
    """The live processes of process group `pgid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _describe(pids: list[int]) -> str:
    """What each process is and where it waits: pid, state, kernel wait channel, command."""
    lines = []
    for pid in pids:
        try:
            stat = Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = Path("/proc", str(pid), "wchan").read_text()
            cmd = Path("/proc", str(pid), "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        lines.append(f"{pid} {stat} {wchan} {cmd[:160]}")
    return "; ".join(lines)


def _wait_for(condition: object, timeout: float, what: str,
              detail: object = None) -> None:
    end = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > end:
            extra = f": still there: {detail()}" if detail is not None else ""  # type: ignore[operator]
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(0.2)


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _ledger(out: Path) -> dict[str, str]:
    try:
        cells = json.loads((out / "grid.json").read_text())["cells"]
    except (OSError, ValueError):
        return {}
    return {c["name"]: c["status"] for c in cells}


def _start(argv: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    tmp = tmp_path / "tmp"  # where rendezvous folders go: must be empty at the end
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp)}
    # A test runner started in the background by a non-interactive shell (`cmd &`) has SIGINT
    # ignored, and exec keeps an ignored signal ignored: restore Ctrl-C's default first, as a
    # terminal's foreground process has it, then become `python -m distsgd` (same pid).
    restore = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
               "os.execv(sys.executable, [sys.executable, '-m', 'distsgd', *sys.argv[1:]])")
    return subprocess.Popen([sys.executable, "-c", restore, *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _stop(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str, float]:
    """Send `sig`; (exit status, stderr, seconds until no process of the group was left)."""
    start = time.monotonic()
    proc.send_signal(sig)
    try:
        _wait_for(lambda: not _group(proc.pid), GONE_WITHIN,
                  f"the processes of {proc.args}", lambda: _describe(_group(proc.pid)))
        gone = time.monotonic() - start
        code = proc.wait(timeout=10)
        _, err = proc.communicate(timeout=10)
    finally:
        for pid in _group(proc.pid):  # never leave them to the rest of the suite
            os.kill(pid, signal.SIGKILL)
    return code, err, gone


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=lambda s: s.name)
def test_compare_cells_die_with_it_and_a_rerun_resumes(
    sig: signal.Signals, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "grid.toml").write_text(GRID)
    out = tmp_path / "grid"
    proc = _start(["compare", str(tmp_path / "grid.toml"), "-j", "2", "--out", str(out),
                   "--no-progress"], tmp_path)
    _wait_for(lambda: _ledger(out).get(SHORT) == "finished"
              and _lines(out / LONG / "metrics.jsonl") >= 1, 180, "the cells to run")
    assert len(_group(proc.pid)) >= 3  # compare, its two cell processes (and a tracker)
    code, err, gone = _stop(proc, sig)
    assert gone < GONE_WITHIN
    expected = {signal.SIGINT: (130, "distsgd: interrupted"),
                signal.SIGTERM: (143, "distsgd: terminated"), signal.SIGKILL: (-9, None)}[sig]
    assert code == expected[0], err
    if expected[1] is not None:  # a SIGKILL says nothing
        assert err.strip().splitlines()[-1] == expected[1], err
    assert "Traceback" not in err
    assert not list((tmp_path / "tmp").glob("distsgd-*"))
    assert _ledger(out) == {SHORT: "finished", LONG: "pending"}
    # A rerun of the finished part reuses it (a lock a SIGKILL left locks nothing).
    (tmp_path / "short.toml").write_text(GRID.split("[[grid]]")[0] + "[[grid]]"
                                         + GRID.split("[[grid]]")[1])
    assert cli.main(["compare", str(tmp_path / "short.toml"), "--out", str(out),
                     "--no-progress"]) == 0
    assert "1 finished before, 0 to run" in capsys.readouterr().err
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("backend", ["sim", "processes"])
def test_sigterm_to_train_is_like_ctrl_c(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(["train", "-a", "allreduce", "--workers", "2", "--backend", backend,
                   "--dataset", "digits", "--model", "mlp", "--steps", "1000000",
                   "--eval-every", "5", "--out", str(out), "--no-progress"], tmp_path)
    _wait_for(lambda: _lines(out / "metrics.jsonl") >= 2, 180, "the run to train")
    code, err, gone = _stop(proc, signal.SIGTERM)
    assert code == 143 and err.strip() == "distsgd: terminated", err
    assert gone < GONE_WITHIN
    assert not list((tmp_path / "tmp").glob("distsgd-*"))  # no distsgd-rendezvous-* left
    assert not (out / LOCK_FILE).exists()
