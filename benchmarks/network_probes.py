"""The network benchmark's probes of the machine, measured in the same torchrun job as the
algorithms (`benchmarks.network`, before them): round trips over each kind of link, and the CPU
that moving bytes costs a process (the simulator's `compute.TRANSFER_CPU`)."""

from __future__ import annotations

import statistics
import time

import torch

from distsgd.comm.base import Comm


def probe(comm: Comm, pairs: list[tuple[int, int]], sizes: list[int], rounds: int = 8,
          gap: float = 0.02) -> dict[str, float]:
    """Round trips through the Comm layer: `a` sends `size` bytes to `b`, `b` answers 8 bytes.

    One pair at a time, `gap` seconds of idleness before each round (as compute leaves the link
    between steps; TCP restarts slowly after idle). Returns the median round trip per
    "a-b-size"; every rank calls it.
    """
    import torch.distributed as dist

    out: dict[str, float] = {}
    reply = torch.zeros(2, dtype=torch.float32)
    for a, b in pairs:
        for size in sizes:
            message, times = torch.zeros(size // 4), []
            for i in range(rounds + 2):  # the first two warm the connection up
                dist.barrier()
                time.sleep(gap)
                t0 = time.perf_counter()
                _round_trip(comm, a, b, message, reply)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            out[f"{a}-{b}-{size}"] = statistics.median(times)
    for size in sizes:  # gloo's all-reduce over every rank, through the Comm layer
        message, times = torch.zeros(size // 4), []
        for i in range(rounds + 2):
            dist.barrier()
            time.sleep(gap)
            t0 = time.perf_counter()
            comm.all_reduce_(message)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[f"allreduce-{size}"] = statistics.median(times)
    return out


def transfer_cpu_probe(comm: Comm, a: int, b: int, size: int, rounds: int = 4) -> float:
    """CPU seconds per byte that moving bytes costs a process (`compute.TRANSFER_CPU`): `a` and
    `b` send each other `size` bytes `rounds` times back to back, each process's CPU time
    (getrusage: every thread, user and system) over the bytes it sent and received, the two
    averaged. Every rank calls it; rank `a` gets the figure (others 0)."""
    import resource

    import torch.distributed as dist

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    message, spent = torch.zeros(size // 4), torch.zeros(1, dtype=torch.float64)
    dist.barrier()
    start = cpu()
    for _ in range(rounds):
        _round_trip(comm, a, b, message, message)
    spent[0] = cpu() - start
    if comm.rank == b:
        comm.send(spent, a)
    elif comm.rank == a:
        theirs = torch.zeros(1, dtype=torch.float64)
        comm.recv(theirs, src=b)
        dist.barrier()
        return float(spent[0] + theirs[0]) / (2 * 2 * size * rounds)
    dist.barrier()
    return 0.0


def _round_trip(comm: Comm, a: int, b: int, there: torch.Tensor, back: torch.Tensor) -> None:
    """`a` sends `there` to `b`, which answers with `back`; other ranks do nothing."""
    if comm.rank == a:
        comm.send(there, b)
        comm.recv(back, src=b)
    elif comm.rank == b:
        comm.recv(there, src=a)
        comm.send(back, a)
