"""Shared references for the optimizer tests: the dense processed input of a layer, computed
from a full input tensor (never from factors), and the layer configurations tested."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actcomp.linalg.decompose import hosvd, truncated_svd
from actcomp.linalg.factors import Tucker

# (name, Conv2d kwargs, kernel 3 unless given): stride, dilation, groups, padding, padding_mode, bias
CONV_CASES = [
    ("plain", dict(stride=1, padding=1)),
    ("stride2", dict(stride=2, padding=1, bias=False)),
    ("dilated-grouped", dict(dilation=2, padding=2, groups=2)),
    ("depthwise", dict(padding=1, groups=4, bias=False)),
    ("same", dict(padding="same", dilation=2)),
    ("same-even", dict(kernel_size=4, padding="same")),  # asymmetric padding
    ("reflect", dict(padding=1, padding_mode="reflect", stride=2)),
    ("circular", dict(padding=2, padding_mode="circular", bias=False)),
    ("replicate-nopad", dict(padding=0, padding_mode="replicate")),
]


def skewed_tucker(x: Tensor) -> Tucker:
    """A Tucker factorisation with non-orthonormal factors (what an arbitrary method could
    keep): random full-rank factors and the core that makes it reconstruct x's projection."""
    ranks = [max(1, s - 1) for s in x.shape]
    factors = [torch.randn(s, k, dtype=x.dtype) for s, k in zip(x.shape, ranks)]
    core = torch.randn(*ranks, dtype=x.dtype)
    return Tucker(core, tuple(factors))


PRODUCERS = {
    "hosvd": lambda x: hosvd(x, 0.8),
    "svd": lambda x: truncated_svd(x, 0.8),
    "skewed": skewed_tucker,
}


def dense_rows(x: Tensor, module: nn.Module, approx: str) -> Tensor:
    """SINGD's processed input a of a layer, from the full input: rows (Linear) or im2col
    patches (Conv2d, channels averaged over groups, padding applied with the layer's mode),
    reduced by a mean for "reduce", a ones column for a bias, then / sqrt(rows)."""
    if isinstance(module, nn.Conv2d):
        b, c = x.shape[:2]
        x = x.reshape(b, module.groups, c // module.groups, *x.shape[2:]).mean(1)
        pads = module._reversed_padding_repeated_twice
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)  # (B, D, L)
        rows = cols.mean(2) if approx == "reduce" else cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(x.shape[0], -1, x.shape[-1]).mean(1) if approx == "reduce" else x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows / math.sqrt(rows.shape[0])


def record_reconstructions(module: nn.Module) -> list[Tensor]:
    """Observe a compressed layer's backward: the reconstructions of its factors, in order."""
    from actcomp.attach import layer_state

    seen: list[Tensor] = []
    layer_state(module).observers.append(lambda record: seen.append(record.factors.reconstruct()))
    return seen


def make_conv(kwargs: dict, in_channels: int = 4, out_channels: int = 8) -> nn.Conv2d:
    """A float64 Conv2d of a CONV_CASES entry."""
    return nn.Conv2d(in_channels, out_channels, **{"kernel_size": 3, **kwargs}).to(torch.float64)
