"""diloco: DiLoCo against a reference written here, local-sgd as its special case, and the
Streaming DiLoCo options (fragments, overlap τ, mixing α, precision)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tiny import batch, make_model
from torch import nn

import distsgd
from distsgd.algorithms.diloco import DiLoCo
from distsgd.comm.base import Comm, ring_allreduce_bytes
from distsgd.errors import UsageError

pytestmark = pytest.mark.timeout(120)

Watch = Callable[[distsgd.DistributedOptimizer], None]


def simulate(n: int, algorithm: distsgd.Algorithm, steps: int, momentum: float = 0.9,
             watch: Watch | None = None, sent: dict[int, int] | None = None,
             ) -> list[torch.Tensor]:
    """Each worker's final flat model after `steps` of SGD (lr 0.1) on its own tiny batches."""

    def body(comm: Comm, roles: distsgd.Roles) -> torch.Tensor:
        model = make_model()
        opt = distsgd.DistributedOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum), algorithm,
            comm=comm)
        before = comm.bytes_sent
        for step in range(steps):
            x, y = batch(comm.rank, step)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if watch is not None:
                watch(opt)
        if sent is not None:
            sent[comm.rank] = comm.bytes_sent - before
        opt.finish()
        return opt.ctx.flat.get()

    return distsgd.simulate_ranks(algorithm, n, body)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference_diloco(n: int, steps: int, H: int, lr: float, mu: float,
                     momentum: float = 0.9) -> list[torch.Tensor]:
    """DiLoCo as the paper's Algorithm 1 writes it, in one process: torch's Nesterov SGD is the
    outer optimizer, stepping θ with the outer gradient θ − mean_i θ_i as its .grad."""
    models = [make_model() for _ in range(n)]
    inner = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=momentum) for m in models]
    theta = flat(models[0]).clone().requires_grad_(True)
    outer = torch.optim.SGD([theta], lr=lr, momentum=mu, nesterov=mu > 0)
    for step in range(steps):
        for i, (m, o) in enumerate(zip(models, inner, strict=True)):
            x, y = batch(i, step)
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            o.zero_grad()
        if (step + 1) % H == 0:
            mean = sum(flat(m) for m in models) / n
            theta.grad = theta.detach() - mean
            outer.step()
            for m in models:
                torch.nn.utils.vector_to_parameters(theta.detach().clone(), m.parameters())
    return [flat(m) for m in models]


def test_outer_lr_one_without_momentum_is_local_sgd_bit_for_bit() -> None:
    ours = simulate(4, DiLoCo(H=3, outer_lr=1.0, outer_momentum=0.0), steps=10)
    local = simulate(4, distsgd.LocalSGD(period=3), steps=10)
    assert all(torch.equal(a, b) for a, b in zip(ours, local, strict=True))


def test_diloco_matches_the_papers_algorithm() -> None:
    n, steps, H = 4, 13, 3
    ours = simulate(n, DiLoCo(H=H), steps=steps)
    reference = reference_diloco(n, steps, H, lr=0.7, mu=0.9)
    for a, b in zip(ours, reference, strict=True):
        # θ − lr(Δ + μv) there, x̄ + (1 − lr)Δ − lr·μ·v here: equal up to float32 rounding.
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_one_fragment_no_delay_no_local_weight_is_plain_diloco() -> None:
    # Plain DiLoCo is the reference above; the streaming options at their neutral values must
    # not change a bit of what the plain configuration computes.
    plain = simulate(4, DiLoCo(H=3, outer_lr=0.5, outer_momentum=0.8), steps=10)
    streaming = simulate(4, DiLoCo(H=3, outer_lr=0.5, outer_momentum=0.8, fragments=1, tau=0,
                                   alpha=0.0, precision="float32"), steps=10)
    assert all(torch.equal(a, b) for a, b in zip(plain, streaming, strict=True))


def spread_by_layer(opt: distsgd.DistributedOptimizer, seen: dict[int, list[torch.Tensor]]) -> None:
    seen.setdefault(opt.ctx.step, []).append(opt.ctx.flat.get())


def identical(xs: list[torch.Tensor], part: slice) -> bool:
    return all(torch.equal(xs[0][part], x[part]) for x in xs[1:])


def test_fragments_are_synchronised_in_turn_spread_over_the_period() -> None:
    # The tiny model has two top-level blocks holding state: fragment 0 is the first Linear
    # (6·5 + 5 = 35 numbers), fragment 1 the second. H = 4, P = 2: fragment 0 at steps 4, 8;
    # fragment 1 at steps 2, 6 (offset ⌊H/P⌋).
    seen: dict[int, list[torch.Tensor]] = {}
    simulate(3, DiLoCo(H=4, fragments=2), steps=8, watch=lambda o: spread_by_layer(o, seen))
    first, second = slice(0, 35), slice(35, None)
    assert identical(seen[2], second) and not identical(seen[2], first)
    assert identical(seen[4], first) and not identical(seen[4], second)
    assert not identical(seen[3], first) and not identical(seen[3], second)
    assert identical(seen[6], second) and identical(seen[8], first)


def test_overlap_merges_tau_steps_after_the_synchronisation() -> None:
    seen: dict[int, list[torch.Tensor]] = {}
    simulate(3, DiLoCo(H=4, tau=2), steps=7, watch=lambda o: spread_by_layer(o, seen))
    whole = slice(None)
    assert not identical(seen[4], whole) and not identical(seen[5], whole)
    assert identical(seen[6], whole)  # merged at step 4 + τ, replacing the local copies


def test_mixing_alpha_keeps_part_of_the_local_model() -> None:
    # α weighs the local copy (Streaming DiLoCo's and torchft's convention): x ← α x + (1 − α) θ.
    seen: dict[int, list[torch.Tensor]] = {}
    simulate(3, DiLoCo(H=4, alpha=0.25, outer_lr=1.0, outer_momentum=0.0), steps=4,
             watch=lambda o: spread_by_layer(o, seen))
    # Just before the merge each worker holds x_i; the merge gives x_i/4 + 3θ/4 with θ the mean:
    # still apart, each at a quarter of its distance from the mean, and the mean unchanged.
    before: dict[int, list[torch.Tensor]] = {}
    simulate(3, DiLoCo(H=100), steps=4, watch=lambda o: spread_by_layer(o, before))
    xs, merged = before[4], seen[4]
    mean = sum(xs) / 3
    for x, m in zip(xs, merged, strict=True):
        torch.testing.assert_close(m, 0.25 * x + 0.75 * mean, atol=1e-6, rtol=0)
    assert not identical(merged, slice(None))


@pytest.mark.parametrize("precision, itemsize", [("float32", 4), ("bfloat16", 2),
                                                 ("float16", 2)])
def test_bytes_are_counted_at_the_precision_sent(precision: str, itemsize: int) -> None:
    n, steps, H = 4, 8, 4
    sent: dict[int, int] = {}
    models = simulate(n, DiLoCo(H=H, precision=precision), steps=steps, sent=sent)
    numel = models[0].numel()
    per_sync = round(ring_allreduce_bytes(numel * itemsize, n))
    assert set(sent.values()) == {per_sync * (steps // H)}
    if precision != "float32":  # the same run up to the rounding of the outer gradient
        exact = simulate(n, DiLoCo(H=H), steps=steps)
        for a, b in zip(models, exact, strict=True):
            torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


def test_fragment_bytes_add_up_to_one_model_per_period() -> None:
    sent: dict[int, int] = {}
    models = simulate(4, DiLoCo(H=4, fragments=2), steps=8, sent=sent)
    sizes = (35, models[0].numel() - 35)
    per_period = sum(round(ring_allreduce_bytes(4 * s, 4)) for s in sizes)
    assert set(sent.values()) == {2 * per_period}


def test_bad_streaming_settings_name_the_argument() -> None:
    with pytest.raises(UsageError, match=r"tau=4 is out of range.*\[0, 3\]"):
        DiLoCo(H=4, tau=4)
    with pytest.raises(UsageError, match="precision='int8' is not a valid choice"):
        DiLoCo(precision="int8")
    with pytest.raises(UsageError, match="fragments=3 is out of range for a model of 2"):
        simulate(2, DiLoCo(fragments=3), steps=1)
