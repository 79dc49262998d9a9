"""`distsgd project`: the predicted speed-up of every algorithm on 4 … 256 workers (issue 4).

Method. Each algorithm runs in the simulator (`SimWorld`) through its real hooks
(`DistributedOptimizer`, and `serve` on server ranks), so the network sees its real message
pattern: who sends what to whom, collectives, server round trips, the NIC queues. The model is a
stand-in with ResNet-50's top-level blocks at 1/1000 of their size (so Crossover's "blocks"
segments keep ResNet-50's proportions), and the network's bandwidth is divided by
k = params / stand-in size: a transfer then takes b·k / bandwidth, exactly what a message k times
larger takes, while latency and per-message overhead, which do not grow with the message, stay as
they are. The compute of one step is a fixed time charged with `elapse` (default: ResNet-50 on one
V100, see `V100_IMAGES_PER_S`); gradient values do not change virtual time, so they stay zero.

Steady state: each worker's time per step is measured over steps warmup+1 … warmup+window (the
first steps include the initial broadcast and the servers' first pulls). With t1 the time per
step of one worker without communication, speed-up(N) = Σ_i t1 / t_i over the N workers: for a
synchronous algorithm (every t_i equal) this is N × t1 / t_N, for an asynchronous one it is the
throughput of all workers (samples per virtual second) over that of one. Efficiency = speed-up/N.
Server ranks of parameter-server algorithms come on top of the N workers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from distsgd import algorithms
from distsgd.algorithms.base import Algorithm
from distsgd.comm.base import Comm
from distsgd.comm.sim import NetworkModel
from distsgd.comm.sim.compute import Slowdown
from distsgd.errors import UsageError, check_range
from distsgd.optimizer import DistributedOptimizer, serve
from distsgd.roles import Roles
from distsgd.runtime import simulate_ranks

# torchvision's resnet50: parameters of each top-level module (total 25,557,032).
RESNET50_BLOCKS: tuple[tuple[str, int], ...] = (
    ("conv1", 9_408), ("bn1", 128), ("layer1", 215_808), ("layer2", 1_219_584),
    ("layer3", 7_098_368), ("layer4", 14_964_736), ("fc", 2_049_000))
RESNET50_PARAMS = 25_600_000  # "25.6 M" float32 = 102.4 MB per message, as the papers round it
STAND_IN_SCALE = 1000  # stand-in blocks are 1/1000 of ResNet-50's: small tensors, headers ≪ |x|
# ResNet-50 v1.5 training, FP32, one V100 16GB: 367 images/s; eight (one DGX-1 node): 2,855/s.
# Source: NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md,
# "Training performance: NVIDIA DGX-1 16GB (8x V100 16GB)" (pytorch-21.03 container).
V100_IMAGES_PER_S = 367.0
DGX1_IMAGES_PER_S = 2855.0
WORKERS = (4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Setting:
    """The modelled cluster and the measurement window; every field is a `distsgd project` flag."""

    params: float = RESNET50_PARAMS  # float32 parameters per message
    bandwidth: float = 1.25e9  # bytes/s per NIC and direction: 10 GbE
    latency: float = NetworkModel().latency  # seconds one way: the simulator's default
    overhead: float = NetworkModel().overhead  # seconds per message/collective: the simulator's
    compute_time: float = 32 / V100_IMAGES_PER_S  # forward+backward of a batch of 32 on a V100
    warmup: int = 5  # steps left out of the measurement
    window: int = 20  # steps measured: a multiple of every default period (τ = 4 and 10)
    slowdown: str = "none"  # seeded per-step compute jitter, as `distsgd train --slowdown`

    def check(self) -> None:
        check_range("params", self.params, 1, high=math.inf, high_open=True)
        check_range("bandwidth", self.bandwidth, 0, low_open=True)
        check_range("latency", self.latency, 0, high=math.inf, high_open=True)
        check_range("overhead", self.overhead, 0, high=math.inf, high_open=True)
        # A speed-up over one worker needs that worker to take some time.
        check_range("compute_time", self.compute_time, 0, high=math.inf, low_open=True,
                    high_open=True)
        check_range("warmup", self.warmup, 1)
        check_range("window", self.window, 1)
        Slowdown.parse(self.slowdown)

    def network(self, stand_in_numel: int) -> NetworkModel:
        k = self.params / stand_in_numel  # each stand-in byte stands for k real ones
        return NetworkModel(latency=self.latency, bandwidth=self.bandwidth / k,
                            overhead=self.overhead)


@dataclass(frozen=True)
class Projection:
    algorithm: str
    workers: int
    step_time: float  # mean over workers of virtual seconds per step, in the window
    speedup: float  # Σ_i t1 / t_i (see the module docstring)

    @property
    def efficiency(self) -> float:
        return self.speedup / self.workers


def stand_in_model() -> nn.Module:
    """ResNet-50's top-level blocks (one parameter each) at 1/STAND_IN_SCALE of their size."""
    blocks = nn.Sequential()
    for name, count in RESNET50_BLOCKS:
        block = nn.Module()
        block.weight = nn.Parameter(torch.zeros(max(1, round(count / STAND_IN_SCALE))))
        blocks.add_module(name, block)
    return blocks


def step_times(algorithm: Algorithm, workers: int, setting: Setting) -> list[float]:
    """Each worker's virtual seconds per step over the measurement window."""
    algorithm.validate(workers, algorithm.default_lr())  # raises on a run it cannot do
    numel = sum(p.numel() for p in stand_in_model().parameters())
    steps = setting.warmup + setting.window

    def body(comm: Comm, roles: Roles) -> float | None:
        model = stand_in_model()
        if roles.is_server(comm.rank):
            serve(model, algorithm, lr=algorithm.default_lr(), comm=comm)
            return None
        momentum = 0.9 if algorithm.local_momentum() else 0.0
        sgd = torch.optim.SGD(model.parameters(), lr=algorithm.default_lr(), momentum=momentum)
        opt = DistributedOptimizer(model, sgd, algorithm, comm=comm)
        opt.ctx.flat.grad_buffer()  # zero gradients: values never change virtual time
        jitter = Slowdown.parse(setting.slowdown).factors(0, opt.ctx.index)
        ends = []
        for _ in range(steps):
            comm.elapse(setting.compute_time * next(jitter))  # forward and backward
            opt.step()
            ends.append(comm.now() or 0.0)
        opt.finish()
        return (ends[-1] - ends[setting.warmup - 1]) / setting.window

    results = simulate_ranks(algorithm, workers, body, network=setting.network(numel))
    return [t for t in results if t is not None]


def configure(names: Sequence[str], settings: Mapping[str, str]) -> list[Algorithm]:
    """Each algorithm's config with the hyperparameters of `settings` it has (textual values)."""
    fields = {name: {f.name for f in dataclasses.fields(algorithms.get(name))} for name in names}
    for key in settings:
        if not any(key in mine for mine in fields.values()):
            valid = ", ".join(sorted(set().union(*fields.values()))) or "none"
            raise UsageError(f"no selected algorithm has a hyperparameter {key!r}; valid "
                             f"hyperparameters: {valid}")
    return [algorithms.create(name, {k: v for k, v in settings.items() if k in fields[name]})
            for name in names]


def baseline(setting: Setting) -> float:
    """t1: one worker's time per step, plain SGD without communication, measured the same way."""
    return step_times(algorithms.create("allreduce"), 1, setting)[0]


def project(names: Sequence[str], workers: Sequence[int], setting: Setting,
            settings: Mapping[str, str] | None = None) -> list[Projection]:
    """Speed-ups of `names` (default hyperparameters, but for `settings`, each given to the
    algorithms that have it) on each number of `workers`."""
    setting.check()
    configs = configure(names, settings or {})
    t1 = baseline(setting)
    out = []
    for name, algorithm in zip(names, configs, strict=True):
        for n in workers:
            times = step_times(algorithm, n, setting)
            # Σ t1/t_i: N × t1/t_N for lock-step algorithms (exactly N when no time is spent
            # communicating), total throughput over one worker's for asynchronous ones.
            speedup = math.fsum(t1 / t for t in times)  # t >= compute time > 0
            out.append(Projection(name, n, math.fsum(times) / len(times), speedup))
    return out


# ----------------------------------------------------------------- the papers' figures
@dataclass(frozen=True)
class Claim:
    """A scaling figure a paper reports, as speed-up(high) / speed-up(low) of one algorithm."""

    source: str
    algorithm: str
    low: int
    high: int
    value: float
    as_efficiency: bool  # report value / (high / low) (SGP's "scaling efficiency")
    settings: tuple[tuple[str, str], ...] = ()  # the paper's hyperparameters where not ours

    @property
    def label(self) -> str:
        return self.algorithm + "".join(f" {k}={v}" for k, v in self.settings)


CLAIMS: tuple[Claim, ...] = (
    Claim("SGP (Assran et al. 2019)", "sgp", 4, 32, 0.886, True),
    Claim("Crossover-SGD (Yeo et al. 2020)", "allreduce", 4, 16, 2.4, False),
    Claim("Crossover-SGD (Yeo et al. 2020)", "crossover", 4, 16, 3.3, False),
    # The Crossover-SGD paper's SGP baseline sends to 2 peers with weights 1/3.
    Claim("Crossover-SGD (Yeo et al. 2020)", "sgp", 4, 16, 3.4, False, (("peers", "2"),)),
)
# SGP's abstract: 90 epochs on 32 nodes take about 1.6 h with SGP and over 5 h with AllReduce.
SGP_VS_ALLREDUCE_32 = 5.0 / 1.6
# The papers' workers are nodes of 8 V100 (SGP: 32 images per GPU, 256 per node) on 10 GbE; a
# node's compute is one DGX-1's throughput, and the intra-node all-reduce (NVLink) is left out.
PAPER_SETTING = Setting(compute_time=256 / DGX1_IMAGES_PER_S)


@dataclass(frozen=True)
class Comparison:
    claim: Claim
    predicted: float


def compare_with_papers(setting: Setting = PAPER_SETTING) -> tuple[list[Comparison], float]:
    """Each claim next to our prediction, and the predicted allreduce/sgp step-time ratio at 32."""
    out, steps = [], {}
    for c in CLAIMS:
        low, high = project([c.algorithm], [c.low, c.high], setting, dict(c.settings))
        ratio = high.speedup / low.speedup
        out.append(Comparison(c, ratio / (c.high / c.low) if c.as_efficiency else ratio))
        steps[(c.label, c.high)] = high.step_time
    [allreduce] = project(["allreduce"], [32], setting)
    return out, allreduce.step_time / steps[("sgp", 32)]


# ----------------------------------------------------------------------- output
def format_table(rows: list[Projection], setting: Setting) -> str:
    names = list(dict.fromkeys(p.algorithm for p in rows))
    counts = list(dict.fromkeys(p.workers for p in rows))
    cell = {(p.algorithm, p.workers): p for p in rows}
    width = max(len(n) for n in names) + 2
    head = "algorithm".ljust(width) + "kind   " + "".join(f"N={n}".rjust(14) for n in counts)
    lines = [describe(setting), "speed-up over one worker (efficiency = speed-up / N)", head]
    for name in names:
        kind = "sync " if algorithms.get(name).synchronous else "async"
        cells = "".join(f"{cell[(name, n)].speedup:7.1f} ({cell[(name, n)].efficiency:4.0%})"
                        .rjust(14) for n in counts)
        lines.append(name.ljust(width) + kind + "  " + cells)
    return "\n".join(lines)


def describe(setting: Setting) -> str:
    return (f"{setting.params / 1e6:g} M float32 parameters ({setting.params * 4 / 1e6:g} MB), "
            f"bandwidth {setting.bandwidth / 1e9:g} GB/s, latency {setting.latency * 1e6:g} µs, "
            f"overhead {setting.overhead * 1e6:g} µs/message, compute "
            f"{setting.compute_time * 1e3:.4g} ms/step (slowdown {setting.slowdown}), steps "
            f"{setting.warmup + 1}..{setting.warmup + setting.window} measured")


def format_comparison(comparisons: list[Comparison], ar_vs_sgp: float,
                      setting: Setting = PAPER_SETTING) -> str:
    lines = [f"the papers' figures ({describe(setting)})",
             f"{'source':32}{'algorithm':17}{'figure':26}{'paper':>7}{'ours':>7}"]
    for c in comparisons:
        what = (f"efficiency {c.claim.low}->{c.claim.high}" if c.claim.as_efficiency
                else f"speed-up {c.claim.low}->{c.claim.high}")
        lines.append(f"{c.claim.source:32}{c.claim.label:17}{what:26}"
                     f"{c.claim.value:7.3g}{c.predicted:7.3g}")
    lines.append(f"{'SGP (Assran et al. 2019)':32}{'sgp':17}{'allreduce/sgp time at 32':26}"
                 f"{SGP_VS_ALLREDUCE_32:7.3g}{ar_vs_sgp:7.3g}")
    return "\n".join(lines)


def plot(rows: list[Projection], path: Path, setting: Setting) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from distsgd.report.style import same_as, series_style

    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.add_subplot()
    counts = sorted({p.workers for p in rows})
    ax.plot(counts, counts, color="black", linestyle=":", label="ideal (N)")
    names = list(dict.fromkeys(p.algorithm for p in rows))
    series = [sorted((p.workers, p.speedup) for p in rows if p.algorithm == n) for n in names]
    # Lines that coincide (e.g. every one-server algorithm) stay visible: each series has its own
    # colour and hollow marker, a series drawn over an earlier one gets larger markers around
    # it, and the legend names the one it covers.
    covers = same_as(series)
    for i, (name, mine) in enumerate(zip(names, series, strict=True)):
        layer = sum(1 for j in range(i) if covers[j] == covers[i] is not None) + (
            covers[i] is not None)
        style = {**series_style(i),
                 "linestyle": "-" if algorithms.get(name).synchronous else "--"}
        covered = covers[i]
        label = name if covered is None else f"{name} (= {names[covered]})"
        ax.plot([n for n, _ in mine], [s for _, s in mine], label=label, markersize=5 + 3 * layer,
                fillstyle="none", **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())  # unlabelled: labels 3, 5, 6, 7 would collide
    ax.set_xlabel("workers N")
    ax.set_ylabel("speed-up over one worker")
    ax.set_title(f"Projected speed-up, {setting.params * 4 / 1e6:g} MB model, "
                 f"{setting.bandwidth * 8 / 1e9:g} Gbit/s, {setting.compute_time * 1e3:.3g} "
                 "ms compute/step", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    # Beside the axes, not on them: it would cover the lines of the smallest N.
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8,
               title="solid: sync, dashed: async", title_fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)  # Figure.savefig renders with Agg, no display needed


# ----------------------------------------------------------------------- run
def print_projection(names: Sequence[str], counts: Sequence[int], setting: Setting,
                     settings: Mapping[str, str], plot_path: str | Path,
                     with_papers: bool = True) -> None:
    """`distsgd project`: the table on stdout and its plot at `plot_path`, then (`with_papers`)
    the papers' figures next to ours. Every algorithm and worker count is checked before any run."""
    setting.check()
    for algorithm in configure(names, settings):  # every bad option fails before any run
        for n in counts:
            algorithm.validate(n, algorithm.default_lr())
    started = time.perf_counter()
    rows = project(names, counts, setting, settings)
    print(format_table(rows, setting))
    plot(rows, Path(plot_path), setting)
    print(f"plot: {plot_path}")
    if with_papers:
        print()
        # The papers' nodes, on the network and with the jitter and window given here.
        papers = replace(PAPER_SETTING, latency=setting.latency, overhead=setting.overhead,
                         slowdown=setting.slowdown, warmup=setting.warmup, window=setting.window)
        print(format_comparison(*compare_with_papers(papers), papers))
    print(f"\nsimulated in {time.perf_counter() - started:.1f} s (real time)")
