"""ReLU, ReLU6, LeakyReLU, Hardtanh keeping a 1-bit mask instead of a float tensor. Exact.

Their backward needs only where the input lay on the identity piece: ReLU dX = dY [x > 0]
(autograd's threshold_backward on the output, the same set), Hardtanh/ReLU6
dX = dY [lo < x < hi] (strict, as hardtanh_backward), LeakyReLU dX = dY [x > 0] + s dY [x <= 0].
The mask is packed 8 per byte: 1/32 of a float32 tensor. In-place variants stay in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from actcomp.policies.base import NeighbourState, register_neighbour
from actcomp.policies.bits import save_codes, saved_codes


class MaskedActivation(torch.autograd.Function):
    """A piecewise-linear activation whose backward needs only a packed mask of the input."""

    @staticmethod
    def forward(ctx, x: Tensor, piece: str, lo: float, hi: float, slope: float, inplace: bool) -> Tensor:  # type: ignore[override]
        if piece == "hardtanh":
            mask = (x > lo) & (x < hi)
            y = F.hardtanh(x, lo, hi, inplace)
        else:
            mask = x > 0
            y = F.leaky_relu(x, slope, inplace) if piece == "leaky" else F.relu(x, inplace)
        save_codes(ctx, mask, 1, "bits")
        ctx.slope, ctx.piece = slope, piece
        if inplace:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        mask = saved_codes(ctx).bool()
        if ctx.piece == "leaky":
            grad = torch.where(mask, grad_out, grad_out * ctx.slope)
        else:
            grad = torch.where(mask, grad_out, grad_out.new_zeros(()))
        return grad, None, None, None, None, None


def _settings(module: nn.Module) -> tuple[str, float, float, float]:
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return "hardtanh", float(module.min_val), float(module.max_val), 0.0
    if isinstance(module, nn.LeakyReLU):
        return "leaky", 0.0, 0.0, float(module.negative_slope)
    return "relu", 0.0, 0.0, 0.0


@register_neighbour(nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)
def masked(module: nn.Module, x: Tensor, state: NeighbourState) -> Tensor | None:
    """Run the activation keeping a 1-bit mask (None: nothing to keep, run it plainly)."""
    if not x.requires_grad or not x.is_floating_point():
        return None
    piece, lo, hi, slope = _settings(module)
    y = MaskedActivation.apply(x, piece, lo, hi, slope, bool(getattr(module, "inplace", False)))
    state.keep("bits", x, (x.numel() + 7) // 8)
    return y
