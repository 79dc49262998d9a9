"""powersgd: PowerSGD (Vogels, Karimireddy, Jaggi 2019), rank-r gradients with error feedback."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distsgd import compression
from distsgd.algorithms.base import Algorithm, WorkerContext, average_gradients_, hyperparameter
from distsgd.algorithms.registry import register


def q_seed(seed: int, step: int, k: int) -> int:
    """The seed of matrix k's first Q (of step `step`'s, without warm start) in a run of `seed`:
    the same on every worker, which need not talk to agree on it."""
    return int(np.random.SeedSequence([seed, 0x9D5, step, k]).generate_state(1)[0])


@dataclass
class Matrix:
    start: int  # offset of the parameter in the flat gradient
    rows: int
    cols: int
    rank: int


@dataclass
class PowerState:
    matrices: list[Matrix]  # the compressed parameters, in parameter order
    vectors: torch.Tensor  # flat gradient indices of the parameters sent uncompressed
    qs: list[torch.Tensor | None]  # each matrix's Q, kept between steps (warm start)
    error: torch.Tensor  # error feedback: what the last approximation left out, M − PQᵀ


@register
@dataclass(frozen=True)
class PowerSGD(Algorithm):
    """Each gradient matrix M (a parameter of shape (n, ...) viewed as n × m) is sent as rank-r
    factors. Per step: M ← g + e (error feedback); Q orthogonalised; P = MQ, all-reduced (one
    message for every P); P orthogonalised; Q = MᵀP, all-reduced and divided by N; the gradient
    becomes PQᵀ and e ← M − PQᵀ. Vectors (biases) and float buffers go in a plain all-reduce,
    divided by N, and (as in PyTorch's hook) their e is M − mean, whose mean over the workers is
    zero. Q starts from a seeded normal draw, the same on every worker, and is reused next step
    (warm start). Before `start_iter` steps, plain allreduce (PyTorch's start_powerSGD_iter).

    The conventions are PyTorch's ``powerSGD_hook`` (Gram-Schmidt for r ≤ 2, QR above; sums
    before division; P and Q of all matrices in one all-reduce each), which
    tests/test_powersgd.py matches on real processes, with two choices of ours: every matrix is
    compressed and no vector is (the hook's ``min_compression_rate`` decides per tensor), and
    the first Q of each matrix is drawn from the run's seed (`q_seed`) rather than the hook's
    own generator, so that no worker depends on the order of DDP's buckets.
    """

    name = "powersgd"
    paper = "Vogels, Karimireddy, Jaggi 2019, 'PowerSGD: Practical Low-Rank Gradient Compression'"
    sends = "all-reduces of the rank-r factors P and Q of every matrix, and of the vectors"

    # Rank 2: PyTorch's hook advises trying 1, 2, 4 (1-4 is typical); the middle one, at which
    # each matrix sends 2(n + m) numbers instead of nm (docs/algorithms.md has rank 1's result).
    rank: int = hyperparameter(2, "r: rank of each gradient matrix's approximation", low=1)
    # PyTorch's hook advises starting at about a tenth of the run: the early gradients are the
    # most sensitive to compression. 10 is that for the CLI's digits runs (169-338 steps).
    start_iter: int = hyperparameter(10, "steps of plain allreduce before compressing", low=0)
    warm_start: bool = hyperparameter(True, "reuse last step's Q (else draw a new one)")
    error_feedback: bool = hyperparameter(True, "add what the approximation left out next step")

    def init(self, ctx: WorkerContext) -> PowerState:
        matrices, vectors, start = [], [], 0
        for p in ctx.flat.params:
            if compression.compressible(p.shape):
                rows, cols = compression.matrix_shape(p.shape)
                matrices.append(Matrix(start, rows, cols, compression.factor_rank(
                    rows, cols, self.rank)))
            else:
                vectors.append(torch.arange(start, start + p.numel(), device=ctx.flat.device))
            start += p.numel()
        index = torch.cat(vectors) if vectors else torch.empty(0, dtype=torch.long)
        return PowerState(matrices, index, [None] * len(matrices),
                          torch.zeros(ctx.flat.num_params, dtype=ctx.flat.dtype,
                                      device=ctx.flat.device))

    def after_backward(self, ctx: WorkerContext, state: PowerState) -> None:
        if ctx.workers == 1:
            return
        if ctx.step < self.start_iter:
            average_gradients_(ctx, ctx.workers_group)
            return
        n, flat, group = ctx.workers, ctx.flat, ctx.workers_group
        grad = flat.grad_buffer()  # live: writing it writes the parameters' .grad
        if self.error_feedback:
            grad.add_(state.error)
        full = grad.clone() if self.error_feedback else grad  # M, before it is replaced

        plain = torch.cat([grad[state.vectors], flat.buffer_values()])
        if plain.numel():
            ctx.comm.all_reduce_(plain, group=group).div_(n)
            grad[state.vectors] = plain[: state.vectors.numel()]
            if flat.buffers:
                flat.set_buffers_(plain[state.vectors.numel():])

        if state.matrices:
            self._compress(ctx, state, grad)
        if self.error_feedback:
            state.error = full - grad

    def _compress(self, ctx: WorkerContext, state: PowerState, grad: torch.Tensor) -> None:
        """Replace every matrix of `grad` by the mean's rank-r approximation PQᵀ."""
        n, group = ctx.workers, ctx.workers_group
        ms = [grad[m.start : m.start + m.rows * m.cols].view(m.rows, m.cols)
              for m in state.matrices]
        qs = [self._q(ctx, state, k) for k in range(len(ms))]
        ps = torch.cat([(mat @ q).reshape(-1) for mat, q in zip(ms, qs, strict=True)])
        ctx.comm.all_reduce_(ps, group=group)
        p_views = self._views(ps, state, rows=True)
        for p in p_views:
            compression.orthogonalize_(p)
        qs_flat = torch.cat([(mat.T @ p).reshape(-1) for mat, p in zip(ms, p_views, strict=True)])
        ctx.comm.all_reduce_(qs_flat, group=group).div_(n)
        q_views = self._views(qs_flat, state, rows=False)
        for mat, p, q in zip(ms, p_views, q_views, strict=True):
            torch.matmul(p, q.T, out=mat)
        state.qs = list(q_views) if self.warm_start else [None] * len(ms)

    def _q(self, ctx: WorkerContext, state: PowerState, k: int) -> torch.Tensor:
        """Matrix k's Q for this step, orthogonalised: last step's (warm start) or a new draw
        from the run's seed, the same on every worker."""
        q = state.qs[k]
        if q is None:
            m = state.matrices[k]
            # Without warm start each step draws anew; the step is part of the seed.
            step = 0 if self.warm_start else ctx.step
            q = compression.initial_q(m.cols, m.rank, q_seed(ctx.seed, step, k), ctx.flat.dtype,
                                      ctx.flat.device)
        return compression.orthogonalize_(q.clone())

    @staticmethod
    def _views(flat: torch.Tensor, state: PowerState, rows: bool) -> list[torch.Tensor]:
        views, start = [], 0
        for m in state.matrices:
            size = (m.rows if rows else m.cols) * m.rank
            views.append(flat[start : start + size].view(-1, m.rank))
            start += size
        return views
