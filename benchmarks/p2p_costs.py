"""What point-to-point messages cost on a shaped link, timed one way, next to the simulator.

2 hosts × 2 processes in network namespaces (distsgd.testing.netns), the link shaped by tc tbf as in
`benchmarks.network`. The namespaces share the machine's monotonic clock, so a message's one-way
time is the receiver's completion time minus the agreed start time, with no round trip added.
Each scenario runs `--rounds` times after 2 warm-up rounds, `--gap` seconds of idle link before
each (as compute leaves it between steps); medians are printed next to the wire time S / rate and
to what the simulator predicts for the same scenario (`SimWorld`, 2 machines sharing the shaped
link), without and with `NetworkModel.rendezvous`.

Ranks a0, a1 are on host 0, b0, b1 on host 1; S is the benchmark model's 1.2 MB.

- gloo pre-posted: b0 posts ``irecv`` first, a0 ``send``s S at 5 ms: the link's own cost.
- gloo late recv: a0 ``isend``s S at 0, b0 posts its receive at 50 ms. If gloo's point-to-point
  is a rendezvous (the payload moves only once the receive is posted), b0 has it at 50 ms + wire.
- comm one: a0 ``comm.send``s S to b0 through TorchComm (header, mailbox thread, payload).
- comm exchange: a0 → b0 and b0 → a0 at once (full duplex: one wire time if nothing serializes).
- comm 2 pairs: a0 ↔ b0 and a1 ↔ b1 at once (a gossip step of 4 ranks: each NIC carries 2 S).
- comm two to one: b0 (across) and a1 (inside host 0) send S to a0 at once: when each arrives.
- comm small after large: b0 sends S to a0, a1 sends 4 KB to a0 at 5 ms (inside host 0).
- comm small behind bulk: a0 sends S to b0, a1 sends 4 KB to b1 at 2 ms: how long a small message
  (a header, a "ready") waits in the shaper's queue behind bulk data going the same way.
- k into one (k = 1, 2, 3): b0, then a1, then b1 send S to a0 at once, by raw gloo
  ``isend``/``irecv`` (a0's receives posted at the start), by `Comm.exchange` (receives posted
  ahead) and by ``send``/``recv`` (the mailbox); then the ratio of each to raw gloo. Likewise
  p swapping (p = 1, 2): a0 ↔ b0 (and a1 ↔ b1) swap S at once, a gossip step.

    .venv/bin/python -m benchmarks.p2p_costs --rates 100,1000
    .venv/bin/python -m benchmarks.p2p_costs --loopback      # k into one only, 4 local processes

Needs root, except with ``--loopback``. Prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.p2p_concurrent import RAW_TAG, ROLES, SIZE, k_into_one, k_table
from distsgd.comm.base import Comm
from distsgd.comm.sim import Link, NetworkModel, SimWorld

SMALL = 4096

# A scenario: every rank calls it with `at(t)` (wait until t seconds after the start) and
# `now()` (seconds since the start); it returns this rank's completion times by label.
Scenario = Callable[[Comm, dict[str, int], Callable[[float], None], Callable[[], float]],
                    dict[str, float]]


def one(comm: Comm, r: dict[str, int], at: Callable[[float], None],
        now: Callable[[], float]) -> dict[str, float]:
    big = torch.zeros(SIZE // 4)
    if comm.rank == r["a0"]:
        comm.send(big, r["b0"])
    if comm.rank == r["b0"]:
        comm.recv(big, r["a0"])
        return {"b0 has it": now()}
    return {}


def exchange(comm: Comm, r: dict[str, int], at: Callable[[float], None],
             now: Callable[[], float]) -> dict[str, float]:
    big = torch.zeros(SIZE // 4)
    if comm.rank in (r["a0"], r["b0"]):
        peer = r["b0"] if comm.rank == r["a0"] else r["a0"]
        comm.send(big, peer)
        comm.recv(big, peer)
        return {f"{'a0' if comm.rank == r['a0'] else 'b0'} has it": now()}
    return {}


def two_pairs(comm: Comm, r: dict[str, int], at: Callable[[float], None],
              now: Callable[[], float]) -> dict[str, float]:
    big = torch.zeros(SIZE // 4)
    peer = {r["a0"]: r["b0"], r["b0"]: r["a0"], r["a1"]: r["b1"], r["b1"]: r["a1"]}[comm.rank]
    comm.send(big, peer)
    comm.recv(big, peer)
    return {f"{ROLES[comm.rank]} has it": now()}


def two_to_one(comm: Comm, r: dict[str, int], at: Callable[[float], None],
               now: Callable[[], float]) -> dict[str, float]:
    big = torch.zeros(SIZE // 4)
    if comm.rank in (r["b0"], r["a1"]):
        comm.send(big, r["a0"])
    got = {}
    if comm.rank == r["a0"]:
        for _ in range(2):
            src = comm.recv(big)
            got[f"a0 has {'b0' if src == r['b0'] else 'a1'}'s"] = now()
    return got


def small_after_large(comm: Comm, r: dict[str, int], at: Callable[[float], None],
                      now: Callable[[], float]) -> dict[str, float]:
    big, small = torch.zeros(SIZE // 4), torch.zeros(SMALL // 4)
    if comm.rank == r["b0"]:
        comm.send(big, r["a0"])
    if comm.rank == r["a1"]:
        at(0.005)
        comm.send(small, r["a0"])
    if comm.rank == r["a0"]:
        comm.recv(small, r["a1"])
        got = {"a0 has a1's 4 KB (sent at 5 ms)": now()}
        comm.recv(big, r["b0"])
        return got | {"a0 has b0's S": now()}
    return {}


def small_behind_bulk(comm: Comm, r: dict[str, int], at: Callable[[float], None],
                      now: Callable[[], float]) -> dict[str, float]:
    big, small = torch.zeros(SIZE // 4), torch.zeros(SMALL // 4)
    if comm.rank == r["a0"]:
        comm.send(big, r["b0"])
    if comm.rank == r["a1"]:
        at(0.002)
        comm.send(small, r["b1"])
    if comm.rank == r["b1"]:
        comm.recv(small, r["a1"])
        return {"b1 has a1's 4 KB (sent at 2 ms)": now()}
    if comm.rank == r["b0"]:
        comm.recv(big, r["a0"])
        return {"b0 has a0's S": now()}
    return {}


COMM_SCENARIOS: dict[str, Scenario] = {
    "comm one": one, "comm exchange": exchange, "comm 2 pairs": two_pairs,
    "comm two to one": two_to_one, "comm small after large": small_after_large,
    "comm small behind bulk": small_behind_bulk}


def gloo_pre_posted(comm: Comm, r: dict[str, int], at: Callable[[float], None],
                    now: Callable[[], float]) -> dict[str, float]:
    """Raw gloo, without the Comm layer (real processes only): the link's own cost."""
    import torch.distributed as dist

    big, me = torch.zeros(SIZE // 4), comm.rank
    if me == r["b0"]:
        work = dist.irecv(big, r["a0"], tag=RAW_TAG)
        assert work is not None
        work.wait()
        return {"b0 has it (sent at 5 ms)": now()}
    if me == r["a0"]:
        at(0.005)  # b0's receive is surely posted by then
        dist.send(big, r["b0"], tag=RAW_TAG)
    return {}


def gloo_late(comm: Comm, r: dict[str, int], at: Callable[[float], None],
              now: Callable[[], float]) -> dict[str, float]:
    """Raw gloo with the receive posted 50 ms after the send: is it a rendezvous?"""
    import torch.distributed as dist

    big, me = torch.zeros(SIZE // 4), comm.rank
    if me == r["a0"]:
        work = dist.isend(big, r["b0"], tag=RAW_TAG)
        assert work is not None
        work.wait()
        return {"a0's isend done": now()}
    if me == r["b0"]:
        at(0.05)
        dist.recv(big, r["a0"], tag=RAW_TAG)
        return {"b0 has it (recv posted at 50 ms)": now()}
    return {}


def _until(t: float) -> None:
    while (left := t - time.perf_counter()) > 0:
        time.sleep(min(0.001, left))


def timed(comm: Comm, named: dict[str, Callable[..., dict[str, float]]], rounds: int,
          gap: float) -> dict[str, dict[str, list[float]]]:
    """Each scenario `rounds` times after 2 warm-up rounds, all ranks starting together: on one
    machine's CLOCK_MONOTONIC (namespaces share it), so one-way times need no round trip. The
    scenarios alternate (round i of every scenario, then round i + 1), so a busy spell of a
    shared machine falls on every method alike, and round i's times may be compared in pairs."""
    roles = {name: rank for rank, name in enumerate(ROLES)}
    results: dict[str, dict[str, list[float]]] = {}
    t0 = 0.0

    def at(t: float) -> None:
        _until(t0 + t)

    def now() -> float:
        return time.perf_counter() - t0

    for i in range(rounds + 2):
        for name, fn in named.items():
            start = torch.tensor([time.perf_counter() + gap + 0.01], dtype=torch.float64)
            with comm.uncounted():
                comm.broadcast_(start, 0)
            t0 = float(start)
            _until(t0)
            got = fn(comm, roles, at, now)
            if i >= 2:
                for label, t in got.items():
                    results.setdefault(name, {}).setdefault(label, []).append(t)
    return results


def _merge(parts: list[Any]) -> dict[str, dict[str, list[float]]]:
    merged: dict[str, dict[str, list[float]]] = {}
    for part in parts:
        for name, labels in (part or {}).items():
            merged.setdefault(name, {}).update(labels)
    return merged


def worker(rounds: int, gap: float, out: Path) -> None:
    import torch.distributed as dist

    from distsgd.comm.torch import group

    torch.set_num_threads(1)
    comm = group.from_torchrun_env(timeout=120.0)
    assert comm is not None, "run under torchrun"
    assert comm.nodes == (0, 0, 1, 1) or comm.nodes[0] == comm.nodes[1], comm.nodes
    named: dict[str, Callable[..., dict[str, float]]] = {
        "gloo pre-posted": gloo_pre_posted, "gloo late recv": gloo_late, **COMM_SCENARIOS}
    named.update(k_into_one())
    results = timed(comm, named, rounds, gap)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(_merge(everyone)))
    comm.close()
    dist.barrier()
    dist.destroy_process_group()


def _loopback_worker(comm: Comm, rounds: int, gap: float) -> dict[str, dict[str, list[float]]]:
    torch.set_num_threads(1)
    return timed(comm, k_into_one(), rounds, gap)


def loopback(rounds: int, gap: float) -> None:
    """k into one between 4 local processes (loopback): the transport's own overhead."""
    from distsgd.launch import launch

    parts = launch(_loopback_worker, 4, args=(rounds, gap), timeout=900, comm_timeout=120,
                   env={"OMP_NUM_THREADS": "1"})
    print(f"\n## loopback, 4 processes: k × S = {SIZE / 1e6:.2f} MB into one rank, p pairs "
          f"swapping S; median ms of {rounds} rounds\n")
    k_table(_merge(parts))


def simulate(rate_bits: float, rendezvous: bool) -> dict[str, dict[str, float]]:
    """Each Comm scenario in the simulator: 2 machines, the shaped rate between them, loopback
    inside (benchmarks.calibrate's textbook figures)."""
    out: dict[str, dict[str, float]] = {}
    roles = {name: rank for rank, name in enumerate(ROLES)}
    for name, fn in COMM_SCENARIOS.items():
        net = NetworkModel(latency=50e-6, bandwidth=1.5e9, hosts=(0, 0, 1, 1),
                           host_link=Link(100e-6, rate_bits / 8), rendezvous=rendezvous)

        def body(comm: Comm, fn: Scenario = fn) -> dict[str, float]:
            def at(t: float) -> None:
                comm.elapse(max(0.0, t - (comm.now() or 0.0)))
            return fn(comm, roles, at, lambda: comm.now() or 0.0)

        for got in SimWorld(4, net).run(body):
            out.setdefault(name, {}).update(got)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="100,1000", help="link rates in Mbit/s, comma-separated")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--gap", type=float, default=0.05, help="idle seconds before each round")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--loopback", action="store_true",
                   help="only k into one, between local processes (no root needed)")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.rounds, args.gap, Path(args.out))
        return
    if args.loopback:
        loopback(args.rounds, args.gap)
        return
    from distsgd.testing import netns

    reason = netns.unavailable()
    if reason is not None:
        sys.exit(f"benchmarks.p2p_costs: cannot create network namespaces: {reason}")
    for mbit in (float(r) for r in args.rates.split(",")):
        wire = SIZE / (mbit * 1e6 / 8)
        with tempfile.TemporaryDirectory() as folder, netns.Hosts(2, rate=mbit * 1e6) as hosts:
            out = Path(folder, "p2p.json")
            done = netns.torchrun(hosts, ["--worker", "--rounds", str(args.rounds), "--gap",
                                          str(args.gap), "--out", str(out)], 2, timeout=600.0,
                                  module="benchmarks.p2p_costs", env={"OMP_NUM_THREADS": "1"})
            if any(d.returncode != 0 for d in done):
                sys.exit("\n".join(d.stdout[-2000:] for d in done))
            results = json.loads(out.read_text())
        plain, rendezvous = simulate(mbit * 1e6, False), simulate(mbit * 1e6, True)
        print(f"\n## {mbit:g} Mbit/s: S = {SIZE / 1e6:.2f} MB, wire time S / rate = "
              f"{wire * 1e3:.1f} ms; ms after the start\n")
        print("| scenario | event | measured median (min–max) | × wire | simulator | "
              "+rendezvous |")
        print("|---|---|---:|---:|---:|---:|")
        for name, labels in results.items():
            if " into one: " in name or " swapping: " in name:
                continue
            for label, times in labels.items():
                med = statistics.median(times)
                sim = [f"{s[name][label] * 1e3:.1f}" if label in s.get(name, {}) else "–"
                       for s in (plain, rendezvous)]
                print(f"| {name} | {label} | {med * 1e3:.1f} ({min(times) * 1e3:.1f}–"
                      f"{max(times) * 1e3:.1f}) | {med / wire:.2f} | {sim[0]} | {sim[1]} |")
        print(f"\n### k into one (senders b0, a1, b1 in that order), p swapping, at {mbit:g} "
              "Mbit/s\n")
        k_table(results)


if __name__ == "__main__":
    main()
