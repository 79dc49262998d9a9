"""Concurrent point-to-point messages, timed by `benchmarks.p2p_costs` (on loopback with
``--loopback``, or in network namespaces): k senders into one rank, and p pairs swapping, each by
raw gloo ``isend``/``irecv``, by `Comm.exchange` (receives posted ahead) and by ``send``/``recv``
(the mailbox), with the ratio of each to raw gloo.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from distsgd.comm.base import Comm

RAW_TAG = 99  # raw gloo's messages: a tag no Comm channel uses
SIZE = 1_204_264  # bytes: the wide MLP of benchmarks.network (301,066 float32 parameters)
# rank -> role: torchrun's placement (ranks 0, 1 on host 0), as in p2p_costs' simulator.
ROLES = ("a0", "a1", "b0", "b1")

Pattern = Callable[[Comm, dict[str, int], Callable[[float], None], Callable[[], float]],
                   dict[str, float]]

K_SENDERS = ("b0", "a1", "b1")  # the first k of them send S into a0 at once
K_METHODS = ("gloo", "exchange", "send/recv")


def _move(comm: Comm, method: str, sends: list[tuple[torch.Tensor, int]],
          recvs: list[tuple[torch.Tensor, int]]) -> None:
    """Send and receive (tensor, peer) pairs at once by `method` (one of `K_METHODS`)."""
    import torch.distributed as dist

    if method == "exchange":
        comm.exchange(sends, recvs)
    elif method == "gloo":
        works = ([dist.irecv(t, src, tag=RAW_TAG) for t, src in recvs]
                 + [dist.isend(t, dst, tag=RAW_TAG) for t, dst in sends])
        for work in works:
            assert work is not None
            work.wait()
    else:
        for t, dst in sends:
            comm.send(t, dst)
        for t, src in recvs:
            comm.recv(t, src)


def into_one(method: str, k: int) -> Pattern:
    """k senders' S into a0 at once, by `method`."""
    def run(comm: Comm, r: dict[str, int], at: Callable[[float], None],
            now: Callable[[], float]) -> dict[str, float]:
        senders = [r[name] for name in K_SENDERS[:k]]
        if method == "exchange" and not hasattr(comm, "exchange"):
            return {}  # a distsgd from before exchange (to measure the old transport)
        if comm.rank == r["a0"]:
            _move(comm, method, [], [(torch.empty(SIZE // 4), s) for s in senders])
            return {"a0 has all": now()}
        if comm.rank in senders:
            _move(comm, method, [(torch.zeros(SIZE // 4), r["a0"])], [])
        return {}
    return run


PAIRS = (("a0", "b0"), ("a1", "b1"))  # the first p pairs swap S at once (full duplex)


def swap(method: str, p: int) -> Pattern:
    """The first `p` pairs of `PAIRS` swap S at once, by `method`: a gossip step."""
    def run(comm: Comm, r: dict[str, int], at: Callable[[float], None],
            now: Callable[[], float]) -> dict[str, float]:
        partner = {r[a]: r[b] for pair in PAIRS[:p] for a, b in (pair, pair[::-1])}
        if comm.rank not in partner or (method == "exchange" and not hasattr(comm, "exchange")):
            return {}
        peer = partner[comm.rank]
        _move(comm, method, [(torch.zeros(SIZE // 4), peer)], [(torch.empty(SIZE // 4), peer)])
        return {f"{ROLES[comm.rank]} has it": now()}
    return run


def k_into_one() -> dict[str, Callable[..., dict[str, float]]]:
    return ({f"{k} into one: {m}": into_one(m, k) for k in (1, 2, 3) for m in K_METHODS}
            | {f"{p} swapping: {m}": swap(m, p) for p in (1, 2) for m in K_METHODS})


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q[0], statistics.median(values), q[-1]


def k_table(results: dict[str, dict[str, list[float]]]) -> None:
    """Medians (over rounds, of the last rank's completion) of each k-into-one and swapping
    scenario, and their ratio to raw gloo's; then the spread of the per-round ratios (round i of
    a method against round i of raw gloo: they ran one after the other)."""
    print("| scenario | raw gloo ms | exchange ms | × gloo | send/recv ms | × gloo |")
    print("|---|---:|---:|---:|---:|---:|")
    spreads = []
    for what in [f"{k} into one" for k in (1, 2, 3)] + [f"{p} swapping" for p in (1, 2)]:
        last = {m: [max(ts) for ts in zip(*results[f"{what}: {m}"].values(), strict=True)]
                for m in K_METHODS if results.get(f"{what}: {m}")}
        if "gloo" not in last:
            continue
        med = {m: statistics.median(times) for m, times in last.items()}
        cells = [f"{med['gloo'] * 1e3:.2f}"]
        spread = [what]
        for m in K_METHODS[1:]:
            cells += ([f"{med[m] * 1e3:.2f}", f"{med[m] / med['gloo']:.2f}"] if m in med
                      else ["–", "–"])
            if m in last:
                q1, q2, q3 = _quartiles([a / b for a, b in zip(last[m], last["gloo"],
                                                                 strict=True)])
                spread.append(f"{q2:.2f} ({q1:.2f}–{q3:.2f})")
            else:
                spread.append("–")
        spreads.append(spread)
        print(f"| {what} | {' | '.join(cells)} |")
    print("\nPer-round ratios to raw gloo: median (interquartile range)\n")
    print("| scenario | exchange / gloo | send/recv / gloo |")
    print("|---|---:|---:|")
    for spread in spreads:
        print(f"| {' | '.join(spread)} |")
