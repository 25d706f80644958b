"""Unbiased low-rank estimates of activations: the principal subspace kept, the tail sampled.

A truncated decomposition (:func:`actcomp.linalg.decompose.hosvd`) is the orthogonal projection
of X on its leading subspaces, so the weight gradient computed from it, dW~ = dW(P X), misses
what the discarded tail of X contributes, and misses it at every step in the same directions
(the tail of one layer's input varies little from batch to batch): a bias an optimizer
accumulates. Here each mode's projection is replaced by a random matrix whose mean is the
identity. With the unfolding's singular values s_1 >= s_2 >= ... and singular vectors u_i,
direction i is included with probability p_i = min(1, s_i / tau), tau chosen so that
sum_i p_i = k (the rank the truncated decomposition keeps at the same eps), and an included
direction is scaled by 1 / p_i:

    Q = sum_i (b_i / p_i) u_i u_i^T,   b_i ~ Bernoulli(p_i),   E[Q] = sum_i u_i u_i^T = I.

Directions with p_i = 1 (the largest, s_i >= tau) are the principal subspace, kept exactly; the
tail is sampled in proportion to s_i, which minimises the estimate's variance
sum_i s_i^2 (1 / p_i - 1) under sum_i p_i = k. The indicators are drawn by systematic sampling
(one uniform offset u, the points u, u + 1, ..., u + k - 1 laid over the cumulative p_i): each
direction's inclusion probability is exactly p_i and exactly k directions are kept: for one
unfolding (:func:`sampled_svd`) the memory is the truncated decomposition's; in a Tucker form
each later mode's k comes from eps on the tensor projected on the directions drawn so far
(on the demo's layers at or below hosvd's ranks). Every linear function of the estimate, the weight
gradient dW = dY . X among them, is then unbiased: E[dW(X~)] = dW(X) (PRAC, arXiv 2602.23111;
WTA-CRS, NeurIPS 2023, for the same idea on sampled column-row pairs).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from actcomp.linalg.decompose import hosvd, mode_thresholds, truncation_order
from actcomp.linalg.factors import LowRank, Tucker
from actcomp.linalg.numerics import Unfolding, check_eps, finite_scaled, one_thread, own, rank_tensor, threads_for, unscaled

__all__ = ["inclusion_probabilities", "systematic_sample", "sampled_hosvd", "sampled_svd"]


def inclusion_probabilities(singular_values: Tensor, rank: int) -> Tensor:
    """p_i = min(1, s_i / tau) with sum_i p_i = min(rank, number of s_i > 0).

    ``singular_values`` s (any order, >= 0). tau is found by capping the largest values one at a
    time: with the j largest capped at 1, tau_j = (sum of the others) / (rank - j), the first j
    whose (j+1)-th largest value is below tau_j. These p_i minimise sum_i s_i^2 (1 / p_i - 1),
    the variance of an unbiased estimate that keeps direction i with probability p_i scaled by
    1 / p_i, among all p with sum p = rank and 0 <= p_i <= 1. Zero values get p_i = 0.
    """
    s = singular_values.detach().to(torch.float64).clamp_min(0).reshape(-1)
    positive = int((s > 0).sum())
    rank = min(int(rank), positive)
    p = torch.zeros_like(s)
    if rank <= 0:
        return p
    order = s.argsort(descending=True)
    desc = s[order]
    tail = desc.flip(0).cumsum(0).flip(0)  # tail[j] = sum_{i >= j} desc[i]
    j = 0
    while j < rank - 1 and desc[j] * (rank - j) >= tail[j]:
        j += 1
    tau = float(tail[j]) / (rank - j)
    capped = torch.zeros_like(desc)
    capped[:j] = 1.0
    capped[j:] = (desc[j:] / tau).clamp_max(1.0)
    p[order] = capped
    return p


def systematic_sample(p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Indices drawn so that index i is included with probability exactly ``p[i]``.

    ``p`` in [0, 1] with sum p = r, a whole number (up to round-off). One uniform u in [0, 1) is
    drawn and the points u, u + 1, ..., u + r - 1 are laid over the cumulative sums of p: index i
    is included when a point falls in [C_{i-1}, C_i), an interval of length p_i <= 1, which
    holds at most one point, and each position of u puts one there with probability p_i. Exactly
    r indices are returned, in increasing order.
    """
    p = p.detach().to(torch.float64).reshape(-1)
    r = int(round(float(p.sum())))
    if r <= 0:
        return torch.zeros(0, dtype=torch.long)
    cumulative = p.cumsum(0)
    cumulative = cumulative * (r / float(cumulative[-1]))  # the last sum exactly r: every point < r lands
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    points = u + torch.arange(r, dtype=torch.float64)
    index = torch.searchsorted(cumulative, points, right=True).clamp_max(p.numel() - 1)
    return index


def _numerically_positive(values: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """Eigenvalues above the round-off level of a Gram matrix of ``size`` rows in ``dtype``
    (the others' singular vectors are noise: they are never sampled)."""
    top = values.max().clamp_min(0)
    return values > top * size * torch.finfo(dtype).eps


@torch.no_grad()
def sampled_hosvd(x: Tensor, eps: float | Sequence[float], generator: torch.Generator | None = None) -> Tucker:
    """A Tucker estimate of x whose expectation is x, with ranks chosen as :func:`hosvd` does.

    The modes are processed in :func:`truncation_order` as in :func:`hosvd`, each on the tensor
    Y already projected on the earlier modes' factors: the eigen-decomposition of the Gram matrix
    of Y's mode-n unfolding gives singular values s_i and vectors u_i, k_n is the smallest rank
    explaining ``eps`` of ||Y||^2 (``eps[n]`` when one threshold per mode is given), and k_n
    directions are drawn by :func:`systematic_sample` with :func:`inclusion_probabilities` p_i;
    the factor U_n holds them (orthonormal) and Y becomes Y x_n U_n^T. The core is the last Y
    scaled by D_n = diag(1 / p_i) on every mode, so that X~ = core x_0 U_0 x_1 U_1 ... equals
    X x_0 Q_0 x_1 Q_1 ... with Q_n = U_n D_n U_n^T (diagonal scalings commute with the other
    modes' products). Given the earlier modes, E[Q_n] is the projector on the column space of
    Y's mode-n unfolding, which holds every mode-n fibre of X x_0 Q_0 ... (they are those of Y
    times diagonal weights), so E[X~] = X and every weight gradient computed from X~ is
    unbiased. A mode with eps_n = 1 is kept whole (Q_n = that projector). At eps = 1 the result
    is :func:`hosvd`'s (exact, no draw). Singular vectors of a mode larger than the rest of the
    tensor come from the smaller Gram matrix (u_i = Y_(n) v_i / s_i); every Gram matrix is
    decomposed exactly (eigh), whatever its size. ``generator`` draws the offsets (the global
    generator when None); computed in float32 (float64 for float64 input), returned in x's dtype.
    """
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"sampled_hosvd needs a non-empty tensor, got shape {tuple(x.shape)}")
    mode_eps = mode_thresholds(eps, x.ndim)
    if all(e >= 1.0 for e in mode_eps):
        return hosvd(x, mode_eps)
    y, scale = finite_scaled(x)
    axes = list(range(x.ndim))
    factors: list[Tensor] = [y] * x.ndim
    weights: list[Tensor | None] = [None] * x.ndim
    for mode in truncation_order(x.shape):
        with threads_for(y):
            unfolding = Unfolding(y, axes, mode)
            gram = unfolding.gram()
        with one_thread():
            values, vectors = torch.linalg.eigh(gram.cpu().double())
        values, vectors = values.flip(-1), vectors.flip(-1)
        if mode_eps[mode] >= 1.0:
            u = unfolding.factor(vectors.to(y.device, y.dtype))
        else:
            k = int(rank_tensor(values, mode_eps[mode]))
            keep = _numerically_positive(values, gram.shape[0], y.dtype)
            p = inclusion_probabilities(values.clamp_min(0).sqrt() * keep, k)
            index = systematic_sample(p, generator)
            chosen = vectors[:, index]
            if unfolding.wide:  # left singular vectors u_i = Y_(n) v_i / s_i
                with threads_for(y):
                    u = unfolding.m @ (chosen / values[index].sqrt()).to(y.device, y.dtype)
            else:
                u = chosen.to(y.device, y.dtype)
            weights[mode] = (1.0 / p[index]).to(y.device, y.dtype)
        with threads_for(y):
            y, axes = unfolding.project(u)
        factors[mode] = u
    core = y.permute([axes.index(n) for n in range(x.ndim)])
    for mode, w in enumerate(weights):
        if w is not None:
            core = core * w.reshape([-1 if n == mode else 1 for n in range(x.ndim)])
    core = unscaled(core, scale)
    return Tucker(own(core, x.dtype), tuple(own(u, x.dtype) for u in factors))


@torch.no_grad()
def sampled_svd(x: Tensor, eps: float, generator: torch.Generator | None = None) -> LowRank:
    """A rank-k estimate ``left @ right`` of the mode-0 unfolding X_(0) whose expectation is X_(0).

    X_(0) = sum_i s_i u_i v_i^T; k is the rank :func:`truncated_svd` keeps at ``eps``, and k
    terms are drawn by :func:`systematic_sample` with :func:`inclusion_probabilities` p_i, each
    scaled by 1 / p_i: X~ = sum_{i drawn} (s_i / p_i) u_i v_i^T, E[X~] = X_(0). Stored as
    ``left = U_k`` and ``right = D U_k^T X_(0)`` (or ``left = X_(0) V_k D``, ``right = V_k^T``
    when X_(0) has more rows than columns), ``right`` in x's trailing shape (k, *x.shape[1:]).
    At eps = 1 every term is kept (exact). ``generator`` draws the offset (the global generator
    when None).
    """
    eps = check_eps(eps)
    if x.ndim < 2 or x.numel() == 0:
        raise ValueError(f"sampled_svd needs a non-empty tensor of 2 or more dims, got {tuple(x.shape)}")
    xc, scale = finite_scaled(x)
    m = xc.reshape(x.shape[0], -1)
    wide = m.shape[0] > m.shape[1]
    with threads_for(m):
        gram = m.T @ m if wide else m @ m.T
    with one_thread():
        values, vectors = torch.linalg.eigh(gram.cpu().double())
    values, vectors = values.flip(-1), vectors.flip(-1)
    if eps >= 1.0:
        index = torch.arange(values.numel())
        weights = torch.ones(values.numel(), dtype=torch.float64)
    else:
        keep = _numerically_positive(values, gram.shape[0], xc.dtype)
        p = inclusion_probabilities(values.clamp_min(0).sqrt() * keep, int(rank_tensor(values, eps)))
        index = systematic_sample(p, generator)
        weights = 1.0 / p[index]
    chosen = vectors[:, index].to(xc.device, xc.dtype)
    weights = weights.to(xc.device, xc.dtype)
    with threads_for(m):
        if wide:
            left, right = unscaled(m @ (chosen * weights), scale), chosen.T
        else:
            left, right = chosen, unscaled((chosen * weights).T @ m, scale)
    k = left.shape[1]
    return LowRank(own(left, x.dtype), own(right.reshape(k, *x.shape[1:]), x.dtype))
