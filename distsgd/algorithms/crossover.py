"""crossover: Crossover-SGD (Yeo, Bae, Jeong, Kwon, Oh 2020)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distsgd import mixing, topology
from distsgd.algorithms.base import Algorithm, WorkerContext, average_gradients_, hyperparameter
from distsgd.algorithms.registry import register
from distsgd.comm.base import Group
from distsgd.errors import UsageError

SEGMENTATIONS = ("blocks", "fine")


def fine_blocks(model: nn.Module, tensors: list[torch.Tensor]) -> list[int]:
    """Sizes of the flat vector's segments for the paper's fine chromosome.

    One segment per module one level below the top (a top-level module without children is its
    own unit): for resnet20 each of the nine residual blocks, the stem's conv and BatchNorm, and
    the classifier. As for 'blocks', a unit's parameters and its buffers sit in different parts
    of the flat vector and so form two segments, and the segments follow the vector's order.
    """
    units = [grandchild for child in model.children()
             for grandchild in (list(child.children()) or [child])]
    owner: dict[int, int] = {}
    for i, unit in enumerate(units):
        for t in list(unit.parameters()) + list(unit.buffers()):
            owner.setdefault(id(t), i)
    sizes: list[int] = []
    last: int | None = None
    for t in tensors:
        o = owner.get(id(t), -1)  # state on no unit (e.g. on the root) is a segment of its own
        if sizes and o == last:
            sizes[-1] += t.numel()
        else:
            sizes.append(t.numel())
            last = o
    return sizes


@dataclass
class CrossoverState:
    bounds: list[tuple[int, int]]  # the segments of the flat model
    group: Group | None = None  # this worker's group (hierarchical mode)
    leaders: list[int] = field(default_factory=list)  # worker indices of the group leaders
    members: list[list[int]] = field(default_factory=list)  # each group's global ranks


@register
@dataclass(frozen=True)
class Crossover(Algorithm):
    """Segment-wise gossip on a load-balanced random topology, optionally hierarchical.

    Each segment of the model is averaged with a different peer: for every (step, segment) the
    shared seed draws a permutation without fixed points, so every worker sends and receives
    exactly one copy of every segment (no hotspot, doubly stochastic, the average model preserved).
    Each idea can be turned off: segments=1 (whole model), fair=false (each worker picks whom it
    receives from, as the reference code's ablation: one copy in, any number out), groups=0
    (flat). segments='fine' is the paper's fine chromosome: one segment per residual block.
    groups=-1 makes one group per machine: torchrun's nodes on real processes,
    `NetworkModel.hosts` in the simulator (where, without hosts, every worker is a machine).
    """

    name = "crossover"
    paper = "Yeo, Bae, Jeong, Kwon, Oh 2020, 'Crossover-SGD'"
    sends = "one message per segment (|x| in total) every step; leaders only when hierarchical"

    segments: int | str = hyperparameter(
        "blocks", "how the model is cut: 'blocks' (one per top-level module), 'fine' (one per "
        "module one level down: resnet20's residual blocks) or a number of equal chunks "
        "(1 = no segmentation)")
    fair: bool = hyperparameter(
        True, "load-balanced derangement (false: each worker picks whom it receives from)")
    groups: int = hyperparameter(
        0, "hierarchical groups: 0 flat; G >= 1 averages gradients inside G contiguous groups "
        "and gossips among their leaders; -1 one group per machine (torchrun node)", low=-1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.segments, str) and self.segments not in SEGMENTATIONS:
            raise UsageError(f"crossover: segments={self.segments!r} is not valid; valid values: "
                             "'blocks', 'fine' or a positive integer")
        if isinstance(self.segments, int) and self.segments < 1:
            raise UsageError(f"crossover: segments={self.segments} is out of range: valid values "
                             "lie in [1, inf), 'blocks' or 'fine'")

    def validate(self, workers: int, lr: float) -> list[str]:
        if self.groups > workers:
            raise UsageError(f"crossover: groups={self.groups} is out of range for {workers} "
                             f"workers: valid values lie in [0, {workers}]")
        return []

    def init(self, ctx: WorkerContext) -> CrossoverState:
        if self.segments == "blocks":
            bounds = mixing.block_segments(ctx.flat.blocks)
        elif self.segments == "fine":
            bounds = mixing.block_segments(fine_blocks(ctx.model, ctx.flat.tensors))
        else:
            bounds = mixing.equal_segments(ctx.flat.numel, min(int(self.segments), ctx.flat.numel))
        state = CrossoverState(bounds)
        if self.groups:
            # new_group is collective: every worker creates every group, in the same order.
            for members in self._groups(ctx):
                group = ctx.comm.new_group([ctx.worker_ranks[i] for i in members])
                state.leaders.append(members[0])
                state.members.append(list(group.ranks))
                if ctx.index in members:
                    state.group = group
        return state

    def _groups(self, ctx: WorkerContext) -> list[list[int]]:
        """The groups' members (worker indices): contiguous, or one group per machine, which keeps
        the gradient all-reduce on the fast links inside a machine and only leaders cross."""
        if self.groups > 0:
            return topology.contiguous_groups(ctx.workers, self.groups)
        node_of = [ctx.nodes[r] for r in ctx.worker_ranks]
        # In order of each machine's first worker: every rank builds the same list.
        return [[i for i, n in enumerate(node_of) if n == node] for node in dict.fromkeys(node_of)]

    def metrics(self, ctx: WorkerContext, state: CrossoverState) -> dict[str, Any]:
        return {"groups": state.members} if state.members else {}

    def after_backward(self, ctx: WorkerContext, state: CrossoverState) -> None:
        if state.group is None or state.group.size == 1:
            return
        # Exact gradient (and buffer) average inside the group, as allreduce does globally.
        average_gradients_(ctx, state.group)

    def after_step(self, ctx: WorkerContext, state: CrossoverState) -> None:
        if state.group is None:
            if ctx.workers > 1:
                x = ctx.flat.get()
                self._gossip(ctx, state, x, list(range(ctx.workers)))
                ctx.flat.set_(x)
            return
        if len(state.leaders) == 1:
            return  # one group: the group average already is the global average
        x = ctx.flat.get()
        if ctx.index in state.leaders:
            self._gossip(ctx, state, x, state.leaders)
        leader_rank = state.group.ranks[0]
        if state.group.size > 1:
            ctx.comm.broadcast_(x, leader_rank, group=state.group)
        ctx.flat.set_(x)

    def _gossip(self, ctx: WorkerContext, state: CrossoverState, x: torch.Tensor,
                members: list[int]) -> None:
        """Average each segment of `x` in place with the copies the schedule sends us."""
        n, me = len(members), members.index(ctx.index)
        plans = [topology.crossover_sources(n, ctx.step, s, ctx.seed, self.fair)
                 for s in range(len(state.bounds))]
        rank_of = [ctx.worker_ranks[m] for m in members]
        # The schedule follows from the shared seed: every receive is posted ahead (exchange)
        sends = [(x[a:b], rank_of[dst]) for (a, b), sources in zip(state.bounds, plans, strict=True)
                 for dst in topology.receivers(sources, me)]  # exactly one per segment when fair
        copies = [torch.empty(b - a, dtype=x.dtype, device=x.device) for a, b in state.bounds]
        ctx.comm.exchange(sends, [(copy, rank_of[sources[me]])  # one copy in, fair or not
                                  for copy, sources in zip(copies, plans, strict=True)])
        for (a, b), copy in zip(state.bounds, copies, strict=True):
            x[a:b] = x[a:b].clone().add_(copy).div_(2)

