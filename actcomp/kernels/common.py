"""What every kernel shares: the per-layer state and the dispatch to a decomposition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from actcomp.config import CompressionConfig, LayerStats
from actcomp.decompose import NonFiniteActivationError, SubspaceTracker, hosvd, tracked_hosvd, truncated_svd
from actcomp.factors import LowRank, Tucker


@dataclass
class LayerState:
    """Attached to a compressed module: its qualified name, its config and its last stats."""

    name: str
    layer_type: str
    config: CompressionConfig
    last: LayerStats | None = None
    tracker: SubspaceTracker | None = None  # method "asi": the subspaces carried between steps

    def describe(self) -> str:
        return f"layer '{self.name}' ({self.layer_type})"


def compress_activation(x: Tensor, layer: LayerState, unfold: Tensor | None = None) -> LowRank | Tucker:
    """Factorise the activation x as ``layer.config`` asks and record the layer's stats.

    ``hosvd`` decomposes x over all its modes; ``asi`` too, carrying the non-batch subspaces
    in ``layer.tracker``; ``svd`` decomposes ``unfold`` (a reshape of x
    whose first mode is the one to factor) or x itself. Runs in float32 (float64 for float64
    input) even under autocast, stores factors in x's dtype. NaN/Inf in x raise
    FloatingPointError naming the layer: a non-finite activation has no meaningful subspace and
    a silent fallback would hide a diverged training run.
    """
    config = layer.config
    try:
        with torch.autocast(x.device.type, enabled=False):
            if config.method == "hosvd":
                factors: LowRank | Tucker = hosvd(x, config.eps)
                ranks = factors.ranks
            elif config.method == "asi":
                if layer.tracker is None:
                    layer.tracker = SubspaceTracker()
                factors = tracked_hosvd(x, config.eps, layer.tracker)
                ranks = factors.ranks
            else:
                factors = truncated_svd(x if unfold is None else unfold, config.eps)
                ranks = (factors.rank,)
    except NonFiniteActivationError:
        raise FloatingPointError(
            f"{layer.describe()}: its input holds NaN or Inf, so no low-rank subspace exists; "
            "the training run has diverged (lower the learning rate, check the data) or use "
            "method='none' for this layer"
        ) from None
    record_stats(layer, x, ranks, factors.nbytes)
    return factors


def record_stats(layer: LayerState, x: Tensor, ranks: tuple[int, ...], kept_bytes: int) -> None:
    layer.last = LayerStats(
        name=layer.name,
        layer_type=layer.layer_type,
        method=layer.config.method,
        eps=layer.config.eps,
        input_shape=tuple(x.shape),
        ranks=tuple(ranks),
        kept_bytes=kept_bytes,
        input_bytes=x.numel() * x.element_size(),
    )


def record_plain_input(layer: LayerState, x: Tensor, weight: Tensor | None) -> None:
    """Stats of a layer run by plain autograd: it keeps its input when its weight is trained."""
    kept = x.numel() * x.element_size() if weight is not None and weight.requires_grad else 0
    record_stats(layer, x, (), kept)


def save_for_weight_grad(ctx, layer: LayerState, x: Tensor, weight: Tensor, kept: Callable[[], tuple[Tensor, ...]]) -> None:
    """``ctx.save_for_backward(weight, *kept())`` when the weight is trained; with a frozen
    weight only the weight (dX needs nothing of x) and stats that say nothing was kept.
    ``kept`` records the layer's stats itself."""
    if weight.requires_grad:
        ctx.save_for_backward(weight, *kept())
    else:
        record_stats(layer, x, (), 0)
        ctx.save_for_backward(weight)


def unpack(kind: type, tensors: tuple[Tensor, ...]) -> LowRank | Tucker:
    """Rebuild the factors saved with ``ctx.save_for_backward(*factors.tensors())``."""
    if kind is Tucker:
        return Tucker(tensors[0], tuple(tensors[1:]))
    return LowRank(*tensors)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a conv/linear on x's device in, or None when it is off.

    A kernel's autograd Function runs with autocast off and casts the weight and bias to this
    dtype inside its forward, so that the layer computes exactly what the plain layer computes
    under autocast, while the Function saves the parameter itself (no extra memory) instead of
    the cast copy plain autocast keeps.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """t in ``dtype`` (None and non-floating tensors unchanged; no dtype: unchanged)."""
    if t is None or dtype is None or not t.is_floating_point():
        return t
    return t.to(dtype)
