"""The linear family: nn.Linear (and layers registered with a (out, in) weight getter), for
inputs with any number of leading dimensions.

For an input X of shape (N_1, ..., N_m, C) and output gradient dY (N_1, ..., N_m, C_out):

* dX = dY W (exact); db = dY summed over the leading modes.
* Tucker X ~ S x_1 U_1 ... x_m U_m x_C U_C: fold every leading mode into dY,
  G = dY x_1 U_1^T ... x_m U_m^T (K_1, ..., K_m, C_out); then
  dW = G_(C_out) S_(C)^T U_C^T, i.e. (C_out x K_C) @ (K_C x C). X is never rebuilt.
* LowRank over the row unfolding X_rows (N_1...N_m x C) ~ L R (rank k):
  dW = (dY_rows^T L) R, i.e. (C_out x k) @ (k x C).

Second-order statistics (:class:`~actcomp.kernels.base.SecondOrder`): the rows a of the input
are its leading indices (``"expand"``: P = Q_1 (x) ... (x) Q_m from the orthonormalised leading
factors, Y = S_rows U_C^T with the triangular parts folded into S), or per sample the mean over
the leading modes after the batch (``"reduce"``); HyLo's per-sample rows I = L R with
L = U_1 (x) ... (x) U_m (identity where a mode has no factor), R = S_rows U_C^T; G = rows of dY.
The export's kernels are the same matrix products (LowRank rows only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actcomp.linalg.factors import LowRank, Tucker, mode_product
from actcomp.kernels.base import ExportKernels, LayerFamily, SecondOrder, register_layer
from actcomp.kernels.second_order import (
    RowRoot,
    SampleFactors,
    check_approx,
    kron_matrices,
    kron_vectors,
    mean_mode,
    mode_size,
    orthonormal_mode,
)
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


def linear_rows(factors: Tucker | LowRank, approx: str = "expand") -> RowRoot:
    """The rows a of a Linear layer's input (..., C) as P Y: every leading mode a row
    (``"expand"``), or per sample the mean over the leading modes after the batch
    (``"reduce"``). P = Q_1 (x) ... (x) Q_m (U_i = Q_i R_i), Y = (S x_i R_i)_rows U_C^T."""
    check_approx(approx)
    core, factors_ = factors.tucker_view()
    *leading, u_channel = factors_
    if approx == "reduce":
        for mode in range(1, len(leading)):
            core = mean_mode(core, leading[mode], mode)
            leading[mode] = None
    rows, ones = 1, []
    for mode, u in enumerate(leading):
        rows *= mode_size(core, u, mode)
        core, q_ones = orthonormal_mode(core, u, mode)
        ones.append(q_ones)
    core_rows = core.reshape(-1, core.shape[-1])
    y = core_rows if u_channel is None else core_rows @ u_channel.T
    return RowRoot(y, kron_vectors(ones), rows)


def linear_samples(factors: Tucker | LowRank) -> SampleFactors:
    """I = L R of a Linear input (..., C), one row per leading index:
    L = U_1 (x) ... (x) U_m (identity where a mode has no factor), R = S_rows U_C^T."""
    core, factors_ = factors.tucker_view()
    *leading, u_channel = factors_
    lefts = [
        u if u is not None else torch.eye(int(core.shape[mode]), dtype=core.dtype, device=core.device)
        for mode, u in enumerate(leading)
    ]
    core_rows = core.reshape(-1, core.shape[-1])
    right = core_rows if u_channel is None else core_rows @ u_channel.T
    return SampleFactors(kron_matrices(lefts), right)


def linear_input_samples(x: Tensor, geometry: None = None, weight_shape: torch.Size | None = None) -> SampleFactors:
    """I of a plain Linear input x (..., C): its rows, in full."""
    return SampleFactors(x.reshape(-1, x.shape[-1]))


def linear_output_samples(grad_out: Tensor) -> tuple[Tensor, int]:
    """(G, B): the rows of dY (n x C_out) and the batch size (1 for an unbatched input)."""
    return grad_out.reshape(-1, grad_out.shape[-1]), (grad_out.shape[0] if grad_out.ndim > 1 else 1)


def linear_export_forward(x: Tensor, weight: Tensor, bias: Tensor | None, geometry: None = None) -> Tensor:
    """y = x W^T + b with a matmul and an add (graph-exportable)."""
    out = x @ weight.T
    return out + bias if bias is not None else out


LINEAR = LayerFamily(
    name="linear",
    geometry=lambda module: None,
    layout=lambda geometry, x: InputLayout(sample_modes=x.ndim - 1),
    forward=linear_forward,
    input_grad=linear_input_grad,
    bias_grad=linear_bias_grad,
    weight_grads={Tucker: tucker_weight_grad, LowRank: lowrank_weight_grad},
    second_order=SecondOrder(
        layers="Linear",
        kfac_rows=lambda factors, geometry, weight_shape, approx: linear_rows(factors, approx),
        factor_samples=lambda factors, geometry, weight_shape: linear_samples(factors),
        input_samples=linear_input_samples,
        output_samples=linear_output_samples,
    ),
    export=ExportKernels(
        layers="Linear",
        forward=linear_export_forward,
        input_grad=linear_input_grad,
        weight_grads={LowRank: lowrank_weight_grad},
    ),
)

register_layer(nn.Linear, family=LINEAR)
