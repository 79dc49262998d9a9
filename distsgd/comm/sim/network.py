"""The simulator's network model: links, NICs, machines, and what collectives cost.

Per link (defaults like 10 GbE): each rank has one full-duplex NIC that sends one message at a
time and receives one at a time. A message of b bytes sent at t leaves when the sender's NIC is
free and occupies it for b / bandwidth; it is fully received latency later, or, if the receiving
NIC (the switch port in front of it) is busy then with other messages, once that port has had
b / bandwidth of idle time for it (`Port`: work-conserving, never idle while bytes wait). So
per-pair FIFO order holds, a rank that pushes to many peers pays for its egress, and a parameter
server that many workers push to pays for its ingress. Collectives cost what a ring all-reduce (or
a binomial-tree broadcast) costs under the same model.

Machines (docs/multi-machine.md): with `NetworkModel.host_link`, a message between machines also
crosses both machines' NICs, each shared by all the ranks of its machine. With
`NetworkModel.rendezvous`, such a message moves as gloo's point-to-point does under TorchComm: its
payload leaves only once its header has crossed, the receiver has taken the messages before it
(one at a time) and a "ready" has crossed back, each small control message waiting behind the
queue of its machine's NIC (benchmarks/p2p_costs.py measures all three).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Link:
    latency: float = 25e-6  # seconds, one way
    bandwidth: float = 1.25e9  # bytes per second (10 Gbit/s)


@dataclass(frozen=True)
class NetworkModel:
    """Latency and bandwidth, with optional per-link overrides keyed by (src, dst)."""

    latency: float = 25e-6
    bandwidth: float = 1.25e9
    links: Mapping[tuple[int, int], Link] = field(default_factory=dict)
    # Fixed cost of handing one message or collective to the transport (framing, syscalls).
    overhead: float = 0.0

    # Machines (docs/multi-machine.md): `hosts[r]` is rank r's machine (ranks past the end each
    # have their own). With `host_link`, a message between two machines also crosses both
    # machines' NICs, each shared by all the ranks of its machine, as on torchrun nodes: the
    # per-rank link (latency, bandwidth, `links`) is then the path inside a machine.
    hosts: tuple[int, ...] = ()
    host_link: Link | None = None
    # Point-to-point as a rendezvous (gloo, hence TorchComm; measured in benchmarks/p2p_costs.py):
    # a message's payload leaves only after its header has reached the receiver, the receiver's
    # one mailbox thread has finished the payload before it and posted the receive, and that
    # "ready" has come back. Between machines each of those control messages queues behind the
    # backlog of its machine's NIC, at most `host_queue` seconds of it (the shaper's queue: tbf
    # `latency 50ms` in distsgd.netns; beyond it TCP holds data back in the sender's socket).
    # Off by default: only messages between machines (`host_link`) are affected.
    rendezvous: bool = False
    host_queue: float = 0.05
    # The CPU that moving a byte costs a rank (seconds of its wall time per byte sent or received:
    # the copies into and out of the socket, TCP): spent while the rank waits for the network it
    # is free, otherwise it delays the rank's next computation (`SimWorld`, "transfer CPU" in
    # docs/multi-machine.md). 0: moving bytes costs no CPU, as with a core to spare.
    # `compute.transfer_cpu` gives it for processes sharing cores.
    cpu_per_byte: float = 0.0

    def link(self, src: int, dst: int) -> Link:
        return self.links.get((src, dst)) or Link(self.latency, self.bandwidth)

    def host(self, rank: int) -> int:
        return self.hosts[rank] if rank < len(self.hosts) else -1 - rank

    def crosses(self, src: int, dst: int) -> bool:
        """Whether a message from `src` to `dst` leaves its machine (over `host_link`)."""
        return self.host_link is not None and self.host(src) != self.host(dst)

    def allreduce_time(self, size: int, n: int, ranks: tuple[int, ...] = ()) -> float:
        # Ring all-reduce (gloo's): 2(n-1) rounds, each moving size/n bytes over every hop of the
        # ring at once, so a round lasts as long as the slowest hop.
        if n <= 1:
            return 0.0
        latency, bandwidth = self._slowest_hop(ranks)
        return self.overhead + 2 * (n - 1) * (latency + size / n / bandwidth)

    def broadcast_time(self, size: int, n: int, ranks: tuple[int, ...] = ()) -> float:
        if n <= 1:
            return 0.0
        latency, bandwidth = self._slowest_hop(ranks)
        return self.overhead + math.ceil(math.log2(n)) * (latency + size / bandwidth)

    def _slowest_hop(self, ranks: tuple[int, ...]) -> tuple[float, float]:
        """(latency, bandwidth) of the slowest hop of a ring over `ranks`, in order: a machine's
        NIC is shared by the ring's hops that leave it."""
        hops = list(zip(ranks, ranks[1:] + ranks[:1], strict=True))
        leaving: dict[int, int] = {}
        for a, b in hops:
            if self.crosses(a, b):
                leaving[self.host(a)] = leaving.get(self.host(a), 0) + 1
        if not leaving or self.host_link is None:
            return self.latency, self.bandwidth
        shared = self.host_link.bandwidth / max(leaving.values())
        return self.latency + self.host_link.latency, min(self.bandwidth, shared)


class Port:
    """The receiving side of a NIC, or the switch port that feeds it: when it is busy delivering.

    Messages are timed in the order they are sent, not the order their bytes reach the port: a
    message that another NIC's queue holds back reserves a later stretch. A port is
    work-conserving (a switch sends whatever packets are queued for it), so a message whose bytes
    arrive before that stretch is served in the idle time before and around it, not behind it;
    a single "free from" time would leave the port idle while those bytes wait.
    """

    def __init__(self, busy: list[tuple[float, float]] | None = None) -> None:
        self.busy: list[tuple[float, float]] = list(busy or [])  # sorted, disjoint

    @property
    def free(self) -> float:
        """When it has delivered everything reserved so far."""
        return self.busy[-1][1] if self.busy else 0.0

    def take(self, ready: float, duration: float) -> float:
        """Deliver `duration` seconds of bytes that may start at `ready`, in the port's idle time
        from then on; returns when the last byte is delivered."""
        t, left, taken = ready, duration, []
        i = next((k for k, (_, end) in enumerate(self.busy) if end > t), len(self.busy))
        while True:
            gap_end = self.busy[i][0] if i < len(self.busy) else math.inf
            if t < gap_end:
                used = min(left, gap_end - t)
                taken.append((t, t + used))
                t, left = t + used, left - used
                if left <= 0.0:
                    break
            t, i = max(t, self.busy[i][1]), i + 1
        self.busy = _merge(self.busy + taken)
        return t

    def forget(self, before: float) -> None:
        """Drop the stretches over by `before` (no message can be sent before then any more)."""
        while len(self.busy) > 1 and self.busy[0][1] <= before:
            self.busy.pop(0)


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif end > start:
            merged.append((start, end))
    return merged


class _HostNics:
    """When each machine's NIC is free to send, and to receive, the next inter-machine message."""

    def __init__(self, network: NetworkModel) -> None:
        self.network = network
        self.egress: dict[int, float] = {}
        self.ingress: dict[int, Port] = {}

    def ready(self, src: int, dst: int, start: float, mailbox_free: float) -> float:
        """When the payload of a message whose header the sending rank hands over at `start` may
        leave (`NetworkModel.rendezvous`): the header crosses, the receiving rank's mailbox is
        free at `mailbox_free`, its "ready" crosses back, each behind its NIC's queue."""
        link, queue = self.network.host_link, self.network.host_queue
        assert link is not None
        out, into = self.network.host(src), self.network.host(dst)
        header = max(start, min(self.egress.get(out, 0.0), start + queue)) + link.latency
        posted = max(header, mailbox_free)
        return max(posted, min(self.egress.get(into, 0.0), posted + queue)) + link.latency

    def cross(self, src: int, dst: int, size: int, start: float) -> tuple[float, float]:
        """(when the sender's machine has sent it, when the receiver's machine has it) for a
        message of `size` bytes that the sending rank hands over at `start`."""
        link = self.network.host_link
        assert link is not None
        out, into = self.network.host(src), self.network.host(dst)
        sent = max(start, self.egress.get(out, 0.0)) + size / link.bandwidth
        self.egress[out] = sent
        port = self.ingress.setdefault(into, Port())
        port.forget(start)
        return sent, port.take(sent + link.latency - size / link.bandwidth, size / link.bandwidth)


@dataclass
class RankNic:
    """One rank's NIC: when it has sent what it was given, and when it is busy receiving."""

    egress_free: float = 0.0
    ingress: Port = field(default_factory=Port)

    @property
    def ingress_free(self) -> float:
        return self.ingress.free


class Nics:
    """Every NIC of a simulated world (each rank's, each machine's): the timing of messages."""

    def __init__(self, network: NetworkModel, world_size: int) -> None:
        self.network = network
        self.ranks = [RankNic() for _ in range(world_size)]
        self.hosts = _HostNics(network)

    def send(self, src: int, dst: int, size: int, clock: float) -> float:
        """Occupy the NICs on the way of a message of `size` bytes that `src` hands over at
        `clock`; returns when `dst` has received it."""
        network, sender, receiver = self.network, self.ranks[src], self.ranks[dst]
        link = network.link(src, dst)
        start = max(clock + network.overhead, sender.egress_free)
        sender.egress_free = start + size / link.bandwidth
        arrival = sender.egress_free + link.latency
        if network.crosses(src, dst):  # then through both machines' shared NICs
            if network.rendezvous:
                start = self.hosts.ready(src, dst, start, receiver.ingress_free)
            sent, arrival = self.hosts.cross(src, dst, size, start)
            sender.egress_free = sent
        receiver.ingress.forget(clock)
        return receiver.ingress.take(arrival - size / link.bandwidth, size / link.bandwidth)
