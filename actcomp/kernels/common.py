"""What every kernel shares: the per-layer state and the dispatch to a decomposition."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from actcomp.config import CompressionConfig, LayerStats
from actcomp.decompose import NonFiniteActivationError, hosvd, truncated_svd
from actcomp.factors import LowRank, Tucker


@dataclass
class LayerState:
    """Attached to a compressed module: its qualified name, its config and its last stats."""

    name: str
    layer_type: str
    config: CompressionConfig
    last: LayerStats | None = None

    def describe(self) -> str:
        return f"layer '{self.name}' ({self.layer_type})"


def compress_activation(x: Tensor, layer: LayerState, unfold: Tensor | None = None) -> LowRank | Tucker:
    """Factorise the activation x as ``layer.config`` asks and record the layer's stats.

    ``hosvd`` decomposes x over all its modes; ``svd`` decomposes ``unfold`` (a reshape of x
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


def unpack(kind: type, tensors: tuple[Tensor, ...]) -> LowRank | Tucker:
    """Rebuild the factors saved with ``ctx.save_for_backward(*factors.tensors())``."""
    if kind is Tucker:
        return Tucker(tensors[0], tuple(tensors[1:]))
    return LowRank(*tensors)


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating tensors to the autocast dtype when autocast is on for their device.

    A kernel's autograd Function runs with autocast off; casting here, outside it, makes the
    layer compute in the same dtype as the plain layer under autocast, while autograd routes
    the gradient back through the cast to the float32 parameters.
    """
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
