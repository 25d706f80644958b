"""Linear with compressed activations, for inputs with any number of leading dimensions.

For an input X of shape (N_1, ..., N_m, C) and output gradient dY (N_1, ..., N_m, C_out):

* dX = dY W (exact); db = dY summed over the leading modes.
* Tucker X ~ S x_1 U_1 ... x_m U_m x_C U_C: fold every leading mode into dY,
  G = dY x_1 U_1^T ... x_m U_m^T (K_1, ..., K_m, C_out); then
  dW = G_(C_out) S_(C)^T U_C^T, i.e. (C_out x K_C) @ (K_C x C). X is never rebuilt.
* LowRank over the row unfolding X_rows (N_1...N_m x C) ~ L R (rank k):
  dW = (dY_rows^T L) R, i.e. (C_out x k) @ (k x C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from actcomp.factors import LowRank, Tucker, _mode_product
from actcomp.kernels import register_kernel
from actcomp.kernels.common import (
    LayerState,
    autocast_dtype,
    cast,
    compress_activation,
    record_plain_input,
    save_for_weight_grad,
    unpack,
)


def tucker_weight_grad(tucker: Tucker, grad_out: Tensor) -> Tensor:
    """dW = (dY folded by the leading factors) contracted with the core, then U_C^T."""
    *u_leading, u_channel = tucker.factors
    dtype = grad_out.dtype
    folded = grad_out
    for mode, u in enumerate(u_leading):
        folded = _mode_product(folded, u.T.to(dtype), mode)
    k_c = u_channel.shape[1]
    small = folded.reshape(-1, grad_out.shape[-1]).T @ tucker.core.to(dtype).reshape(-1, k_c)
    return small @ u_channel.T.to(dtype)


def lowrank_weight_grad(lowrank: LowRank, grad_out: Tensor) -> Tensor:
    """dW = (dY_rows^T L) R."""
    dtype = grad_out.dtype
    rows = grad_out.reshape(-1, grad_out.shape[-1])
    return (rows.T @ lowrank.left.to(dtype)) @ lowrank.right.to(dtype)


class CompressedLinear(torch.autograd.Function):
    """linear(x, W, b) that keeps low-rank factors of x (not x) for the weight gradient."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, layer: LayerState, dtype: torch.dtype | None) -> Tensor:
        return F.linear(x, cast(weight, dtype), cast(bias, dtype))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, weight, bias, layer, _ = inputs
        ctx.has_bias = bias is not None

        def kept() -> tuple[Tensor, ...]:
            factors = compress_activation(x, layer, unfold=x.reshape(-1, x.shape[-1]))
            ctx.kind = type(factors)
            return factors.tensors()

        save_for_weight_grad(ctx, layer, x, weight, kept)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        weight, *saved = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            factors = unpack(ctx.kind, tuple(saved))
            if isinstance(factors, Tucker):
                grad_w = tucker_weight_grad(factors, grad_out)
            else:
                grad_w = lowrank_weight_grad(factors, grad_out)
            grad_w = grad_w.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


@register_kernel(nn.Linear)
def linear_kernel(module: nn.Linear, x: Tensor, layer: LayerState) -> Tensor:
    """Run ``module`` on x keeping factors of x for backward (see the module doc for the math)."""
    if layer.config.method == "gradient_filter":  # no spatial patches: the layer stays exact
        record_plain_input(layer, x, module.weight)
        return F.linear(x, module.weight, module.bias)
    dtype = autocast_dtype(x)
    x = cast(x, dtype)
    with torch.autocast(x.device.type, enabled=False):
        return CompressedLinear.apply(x, module.weight, module.bias, layer, dtype)
