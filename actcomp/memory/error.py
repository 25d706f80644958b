"""How far an approximate training step's gradients are from plain autograd's, split into what
averages out over steps and what does not.

One batch's relative error ||g~ - g|| / ||g|| (what :func:`actcomp.fit`'s ``max_error`` bounds)
mixes two things an optimizer treats differently: a bias, the part of the error that is the same
from batch to batch and that every step adds up, and a spread, the part that changes from batch to
batch and averages out like the minibatch noise of plain SGD. Truncating activations at eps drops
the same directions every step (a bias); sampling the tail (``hosvd_unbiased``) has no bias and a
larger spread. Measured over n batches from the same weights, with e_b = g~_b - g_b:

    bias^2   = ||mean_b e_b||^2 - tr Cov(e) / n        (the unbiased estimate of ||E e||^2)
    spread^2 = tr Cov(e) = sum_b ||e_b - mean e||^2 / (n - 1)
    noise^2  = tr Cov(g) = sum_b ||g_b - mean g||^2 / (n - 1)   (plain's own minibatch noise)

each reported relative to ||mean_b g_b||. ``learning_error`` combines them into the error an
optimizer that averages over ``horizon`` steps sees, relative to the minibatch noise it sees
anyway: sqrt(bias^2 + spread^2 / horizon) / (noise / sqrt(horizon)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["GradientErrorStats", "gradient_error_stats", "per_tensor_error_stats"]


def _flat_pair(estimate: Sequence[Tensor | None], exact: Sequence[Tensor | None]) -> tuple[Tensor, Tensor]:
    """Both gradient lists flattened into float64 vectors; a None beside a tensor is zeros."""
    if len(estimate) != len(exact):
        raise ValueError(f"an estimate has {len(estimate)} parameter gradients, the exact gradient {len(exact)}")
    parts_est, parts_exact = [], []
    for a, b in zip(estimate, exact):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        parts_est.append(a.detach().reshape(-1).to(torch.float64))
        parts_exact.append(b.detach().reshape(-1).to(torch.float64))
    empty = torch.zeros(0, dtype=torch.float64)
    return (torch.cat(parts_est) if parts_est else empty), (torch.cat(parts_exact) if parts_exact else empty)


@dataclass(frozen=True)
class GradientErrorStats:
    """Bias, spread and the plain minibatch noise of a gradient estimate, each relative to the
    norm of the mean exact gradient (see the module's docstring); ``batches``: how many."""

    bias: float
    spread: float
    noise: float
    batches: int

    def learning_error(self, horizon: float = 10.0) -> float:
        """sqrt(bias^2 + spread^2 / H) / (noise / sqrt(H)): the error an optimizer averaging
        over H steps (Adam's beta1 = 0.9: H = 10) is left with, in units of the minibatch noise
        it is left with anyway. Below 1 the approximation hides in the noise; a bias grows
        against the noise as sqrt(H), a spread does not."""
        if not self.noise > 0:
            return math.inf if (self.bias > 0 or self.spread > 0) else 0.0
        return math.sqrt(self.bias**2 * horizon + self.spread**2) / self.noise


def gradient_error_stats(
    estimates: Sequence[Sequence[Tensor | None]], exact: Sequence[Sequence[Tensor | None]]
) -> GradientErrorStats:
    """Bias, spread and noise of per-batch gradient ``estimates`` against the ``exact``
    gradients of the same batches (one list of parameter gradients per batch, None for a
    parameter without one, taken as zero).

    With e_b = estimate_b - exact_b over n >= 2 batches: bias = sqrt(max(0, ||mean e||^2 -
    tr Cov(e) / n)) / ||mean exact||, the unbiased estimate of ||E e||^2 with the sampling error of
    the mean removed (an unbiased estimator measures ~0 whatever its spread, a truncation its
    systematic error); spread = sqrt(tr Cov(e)) / ||mean exact||; noise = sqrt(tr Cov(exact)) /
    ||mean exact||. ValueError for fewer than 2 batches or mismatched lists.
    """
    if len(estimates) != len(exact) or len(exact) < 2:
        raise ValueError(f"gradient_error_stats needs the same number (>= 2) of estimated and exact batches, got {len(estimates)} and {len(exact)}")
    pairs = [_flat_pair(est, ref) for est, ref in zip(estimates, exact)]
    g = torch.stack([ref for _, ref in pairs])
    e = torch.stack([est - ref for est, ref in pairs])
    n = g.shape[0]
    mean_g, mean_e = g.mean(0), e.mean(0)
    cov_e = float(((e - mean_e) ** 2).sum()) / (n - 1)
    cov_g = float(((g - mean_g) ** 2).sum()) / (n - 1)
    scale = float(mean_g.norm())
    if scale == 0:
        raise ValueError("the exact gradients average to zero: no relative error can be given")
    bias_sq = max(0.0, float((mean_e**2).sum()) - cov_e / n)
    return GradientErrorStats(math.sqrt(bias_sq) / scale, math.sqrt(cov_e) / scale, math.sqrt(cov_g) / scale, n)


def per_tensor_error_stats(
    estimates: Sequence[Sequence[Tensor | None]], exact: Sequence[Sequence[Tensor | None]]
) -> list[GradientErrorStats | None]:
    """:func:`gradient_error_stats` of each parameter tensor on its own (None where the exact
    gradients of that tensor average to zero or are missing): an optimizer that normalises per
    coordinate (Adam) weighs a layer's error against that layer's gradient, not the model's."""
    if not exact or any(len(b) != len(exact[0]) for b in (*estimates, *exact)):
        raise ValueError("per_tensor_error_stats needs one gradient per parameter in every batch")
    out: list[GradientErrorStats | None] = []
    for i in range(len(exact[0])):
        try:
            out.append(gradient_error_stats([[b[i]] for b in estimates], [[b[i]] for b in exact]))
        except ValueError:
            out.append(None)
    return out
