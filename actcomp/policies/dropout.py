"""Dropout keeping its mask as bits. Exact, and the same random numbers as plain dropout.

Plain dropout keeps its mask as bytes (CUDA's fused kernel) or as the float noise tensor
(CPU); here the mask is packed 8 per byte. The forward draws exactly what torch's own dropout
draws on that device, so outputs equal plain dropout's for the same generator state, and
dX = dY * mask / (1 - p) as plain backward computes it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from actcomp.policies.base import NeighbourState, register_neighbour
from actcomp.policies.bits import save_codes, saved_codes


class PackedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, inplace: bool) -> Tensor:  # type: ignore[override]
        if x.device.type == "cpu":
            noise = torch.empty_like(x).bernoulli_(1 - p)  # what torch's CPU dropout draws
            noise.div_(1 - p)
            mask = noise != 0
            y = x.mul_(noise) if inplace else x * noise
            ctx.scale = float(noise.max()) if bool(mask.any()) else 1.0 / (1 - p)
        else:
            y, mask = torch.native_dropout(x, p, True)
            if inplace:
                x.copy_(y)
                y = x
            ctx.scale = 1.0 / (1 - p)
        save_codes(ctx, mask, 1, "bits")
        ctx.device_type = x.device.type
        if inplace:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        mask = saved_codes(ctx).bool()
        if ctx.device_type == "cpu":
            return grad_out * (mask.to(grad_out.dtype) * ctx.scale), None, None
        return torch.ops.aten.native_dropout_backward(grad_out, mask, ctx.scale), None, None


@register_neighbour(nn.Dropout)
def dropout(module: nn.Dropout, x: Tensor, state: NeighbourState) -> Tensor | None:
    """Training-mode dropout with 0 < p < 1 on an input that needs a gradient, mask as bits."""
    if not module.training or not x.requires_grad or not 0 < module.p < 1 or not x.is_floating_point():
        return None
    y = PackedDropout.apply(x, float(module.p), bool(module.inplace))
    state.keep("bits", x, (x.numel() + 7) // 8)
    return y
