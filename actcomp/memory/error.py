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

import copy
import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from actcomp.core.config import CompressionConfig

__all__ = ["GradientErrorStats", "RunningError", "calibration_gradients", "gradient_error_stats", "median_layer_bias", "per_tensor_error_stats"]


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


class RunningError:
    """Bias and spread of :func:`gradient_error_stats` for one gradient tensor, accumulated
    batch by batch without keeping the batches' gradients (what :func:`actcomp.plan` needs for
    every layer at every eps).

    ``add(estimate, exact)`` per batch updates, in float64, the mean error mean e, the sum of
    squared deviations sum_b ||e_b - mean e||^2 (Welford's update, no cancellation) and the sum of
    the exact gradients; with n batches, tr Cov(e) = that sum / (n - 1), ``bias`` =
    sqrt(max(0, ||mean e||^2 - tr Cov(e) / n)) / ||mean g|| and ``spread`` = sqrt(tr Cov(e)) /
    ||mean g||, the numbers :func:`gradient_error_stats` gives on the kept lists.
    :meth:`averaged` = sqrt(bias^2 + spread^2 / H): the error left in a gradient averaged over H
    steps, as Adam's first moment averages (beta1 = 0.9: H = 10); a truncation's error is mostly
    bias and stays, a sampled estimator's is spread and shrinks as 1 / sqrt(H). For a mean exact
    gradient of zero every measure is 0 if the errors are zero too, else infinity."""

    def __init__(self) -> None:
        self.mean_error: Tensor | None = None
        self.sum_exact: Tensor | None = None
        self.deviations = 0.0
        self.count = 0

    def add(self, estimate: Tensor, exact: Tensor) -> None:
        """One batch's estimated and exact gradient (same shape)."""
        if estimate.shape != exact.shape:
            raise ValueError(f"estimate and exact gradients differ in shape: {tuple(estimate.shape)} and {tuple(exact.shape)}")
        error = (estimate.detach() - exact.detach()).double().reshape(-1)
        exact = exact.detach().double().reshape(-1)
        self.count += 1
        if self.mean_error is None or self.sum_exact is None:
            self.mean_error, self.sum_exact = error, exact
            return
        delta = error - self.mean_error
        self.mean_error = self.mean_error + delta / self.count
        self.deviations += float(delta.dot(error - self.mean_error))
        self.sum_exact = self.sum_exact + exact

    def _squares(self) -> tuple[float, float, float]:
        """(bias^2, tr Cov(e), ||mean g||) unscaled; ValueError before 2 batches."""
        n = self.count
        if n < 2 or self.mean_error is None or self.sum_exact is None:
            raise ValueError(f"a bias and a spread need at least 2 batches, got {n}")
        cov = max(0.0, self.deviations / (n - 1))
        return max(0.0, float(self.mean_error.square().sum()) - cov / n), cov, float((self.sum_exact / n).norm())

    @staticmethod
    def _relative(square: float, scale: float) -> float:
        if scale == 0:
            return 0.0 if square == 0 else math.inf
        return math.sqrt(square) / scale

    @property
    def bias(self) -> float:
        """The bias relative to the mean exact gradient."""
        bias_sq, _, scale = self._squares()
        return self._relative(bias_sq, scale)

    @property
    def spread(self) -> float:
        """The batch-to-batch spread of the error relative to the mean exact gradient."""
        _, cov, scale = self._squares()
        return self._relative(cov, scale)

    def averaged(self, horizon: float = 10.0) -> float:
        """sqrt(bias^2 + spread^2 / horizon), relative to the mean exact gradient."""
        bias_sq, cov, scale = self._squares()
        return self._relative(bias_sq + cov / horizon, scale)


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


def calibration_gradients(
    model: nn.Module,
    estimate: "CompressionConfig | nn.Module",
    batches: Any,
    loss_fn: Callable | None = None,
    *,
    chunks: int | None = None,
    micro_batches: int = 1,
) -> tuple[list[list[Tensor | None]], list[list[Tensor | None]]]:
    """Per-batch gradients of an approximate step and of its exact counterpart, from the same
    weights: (estimates, exact), one list of trainable-parameter gradients per batch.

    ``model``: the model as it trains (left untouched: both sides run on deep copies, BatchNorm
    statistics included). ``estimate``: a :class:`~actcomp.CompressionConfig` (every layer of a
    copy of ``model`` compressed with it) or a compressed model (e.g. with its own layers or
    neighbours; a deep copy of it runs, so it is left untouched too). ``batches``: a list of batches in any
    form :func:`actcomp.fit` takes (a tensor, ``(inputs..., targets)`` with ``loss_fn``, or a
    dict), or, with ``chunks=k``, one batch split into k chunks, each then a batch of its own.
    Each batch is run as ``micro_batches`` chunks with gradients accumulated (losses weighted
    by chunk size, exactly the full batch's mean-loss gradient for plain autograd); the exact
    side runs the same chunks, so micro-batching's own effect on BatchNorm is not counted as
    error. One copy of the estimate runs every batch in turn, so a sampled method draws anew
    for each, as it does from step to step."""
    from actcomp.attach import compress
    from actcomp.core.batch import model_inputs, step_loss
    from actcomp.levers.microbatch import split_batch

    if chunks is not None:
        batches = split_batch(batches, chunks)
    batches = list(batches)
    if len(batches) < 2:
        raise ValueError(f"the gradient measures need at least 2 batches (or one batch and chunks >= 2), got {len(batches)}")
    exact_model = copy.deepcopy(model)
    if isinstance(estimate, nn.Module):
        estimate_model = copy.deepcopy(estimate)
    else:
        estimate_model = copy.deepcopy(model)
        compress(estimate_model, "all", config=estimate, sample=model_inputs(batches[0], loss_fn))

    def grads(m: nn.Module, batch: Any) -> list[Tensor | None]:
        m.zero_grad(set_to_none=True)
        size = _size(batch)
        for part in split_batch(batch, micro_batches):
            (step_loss(m, part, loss_fn) * (_size(part) / size)).backward()
        out = [None if p.grad is None else p.grad.detach().clone() for p in m.parameters() if p.requires_grad]
        m.zero_grad(set_to_none=True)
        return out

    exact = [grads(copy.deepcopy(exact_model), batch) for batch in batches]
    estimates = [grads(estimate_model, batch) for batch in batches]
    return estimates, exact


def median_layer_bias(
    model: nn.Module,
    estimate: "CompressionConfig | nn.Module",
    batches: Any,
    loss_fn: Callable | None = None,
    *,
    chunks: int | None = None,
    micro_batches: int = 1,
) -> float:
    """The gradient measure that orders approximate steps by the accuracy they cost: the median,
    over the model's weight tensors, of each tensor's bias relative to its own mean gradient.

    With :func:`calibration_gradients` (same arguments: ``batches`` a list of batches, or one
    batch with ``chunks=k`` split into k; the exact side on the same ``micro_batches``), e_b,l =
    g~_b,l - g_b,l for weight tensor l (parameters named ``*weight``) and batch b, and
    bias_l = sqrt(max(0, ||mean_b e_b,l||^2 - tr Cov_b(e_l) / n)) / ||mean_b g_b,l|| (see
    :func:`gradient_error_stats`); the result is median_l bias_l. Each layer is weighed against
    its own gradient, as a per-coordinate optimizer (Adam) weighs it; the spread that averages
    out from step to step is left out, the error that every step repeats is kept; the median is
    not swayed by a few layers whose mean gradient is near zero. On the demo task (BENCHMARKS.md
    ``quality-measures``) it ranks compressed variants by the accuracy they lose better than
    one batch's relative error ||g~ - g|| / ||g|| (what fit's ``max_error`` bounds), which
    charges an unbiased estimator for a spread the optimizer averages away. Optimizer-free:
    nothing is updated, ``model`` and ``estimate`` are left as they were."""
    estimates, exact = calibration_gradients(model, estimate, batches, loss_fn, chunks=chunks, micro_batches=micro_batches)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    stats = [s for name, s in zip(names, per_tensor_error_stats(estimates, exact)) if s is not None and name.endswith("weight")]
    if not stats:
        raise ValueError("the model has no trained weight tensor with a nonzero mean gradient: no layer bias can be measured")
    return float(statistics.median(s.bias for s in stats))


def _size(batch: Any) -> int:
    from actcomp.levers.microbatch import _batch_size

    size = _batch_size(batch)
    if size is None:
        raise ValueError("the batch holds no tensor with a batch dimension (dim 0)")
    return size
