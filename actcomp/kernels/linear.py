"""The linear family: nn.Linear (and layers registered with a (out, in) weight getter), for
inputs with any number of leading dimensions.

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

from actcomp.linalg.factors import LowRank, Tucker, mode_product
from actcomp.kernels.base import LayerFamily, register_layer
from actcomp.methods.base import InputLayout


def tucker_weight_grad(tucker: Tucker, grad_out: Tensor, weight_shape: torch.Size | None = None, geometry: None = None) -> Tensor:
    """dW = (dY folded by the leading factors) contracted with the core, then U_C^T."""
    *u_leading, u_channel = tucker.factors
    dtype = grad_out.dtype
    folded = grad_out
    for mode, u in enumerate(u_leading):
        folded = mode_product(folded, u.T.to(dtype), mode)
    k_c = u_channel.shape[1]
    small = folded.reshape(-1, grad_out.shape[-1]).T @ tucker.core.to(dtype).reshape(-1, k_c)
    return small @ u_channel.T.to(dtype)


def lowrank_weight_grad(lowrank: LowRank, grad_out: Tensor, weight_shape: torch.Size | None = None, geometry: None = None) -> Tensor:
    """dW = (dY_rows^T L) R."""
    dtype = grad_out.dtype
    rows = grad_out.reshape(-1, grad_out.shape[-1])
    return (rows.T @ lowrank.left.to(dtype)) @ lowrank.right.reshape(lowrank.rank, -1).to(dtype)


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, geometry: None = None) -> Tensor:
    """``F.linear(x, W, b)``, returned as a tensor that is not a view.

    An autograd Function's output that is a view of a tensor made inside its forward cannot be
    modified in place afterwards (``ReLU(inplace=True)``, ``+=``), and F.linear returns such a
    view for inputs of 3 or more dims with a bias (and for 1-D inputs). The same addmm writes
    into a fresh tensor instead, bit for bit what F.linear computes.
    """
    if x.ndim >= 3 and bias is not None and x.is_contiguous():
        out = x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.result_type(x, weight))
        torch.addmm(bias, x.view(-1, x.shape[-1]), weight.t(), out=out.view(-1, weight.shape[0]))
        return out
    y = F.linear(x, weight, bias)
    return y.clone() if y._is_view() else y


def linear_input_grad(grad_out: Tensor, weight: Tensor, input_shape: torch.Size, geometry: None = None) -> Tensor:
    """dX = dY W."""
    return grad_out @ weight


def linear_bias_grad(grad_out: Tensor) -> Tensor:
    """db = dY summed over every leading mode."""
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0)


LINEAR = LayerFamily(
    name="linear",
    geometry=lambda module: None,
    layout=lambda geometry, x: InputLayout(sample_modes=x.ndim - 1),
    forward=linear_forward,
    input_grad=linear_input_grad,
    bias_grad=linear_bias_grad,
    weight_grads={Tucker: tucker_weight_grad, LowRank: lowrank_weight_grad},
)

register_layer(nn.Linear, family=LINEAR)
