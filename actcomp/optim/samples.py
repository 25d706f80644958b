"""HyLo's per-sample matrices of a layer: inputs I (n x D) and output gradients G (n x C_out).

HyLo approximates a layer's per-sample gradient by the rank-one G_j I_j^T (Linear: exact, one
row of the input per sample; Conv2d: G_j and I_j are sample j's output gradient and input
patches averaged over the output locations, channels averaged over the conv's groups as SINGD
does), with a ones column in I for the bias. Its Fisher is F = (1/n) sum_j u_j u_j^T with
u_j = vec(G_j I_j^T), and everything HyLo needs of I is I's rows through the kernel
I I^T, their norms and products I M^T.

From a Tucker or LowRank factorisation of the input, I = L R with L (n x k) and R (k x D) is
exact for the reconstructed input and never formed: Linear, L = U_0 (x) U_1 ... over the
leading modes (identity where a mode has no factor) and R = S_rows U_C^T; Conv2d, L = U_B and
R = the patch means of the core expanded in the channel and spatial modes (the per-mode patch
averaging matrices applied to the padded spatial factors). The bias appends a column: L' =
[L, 1], R' = [[R, 0], [0, 1]]. HyLo then keeps B x k + k x D numbers for I instead of B x D.

The family-specific rows live with their family (:attr:`actcomp.kernels.LayerFamily.second_order`:
:mod:`actcomp.kernels.linear`, :mod:`actcomp.kernels.conv`); the functions here ask the registry
for the layer's family.
"""

from __future__ import annotations

import torch
from torch import Tensor

from actcomp.kernels.base import LayerFamily, family_named, second_order_layers
from actcomp.kernels.conv import CONV, ConvGeometry, conv2d_samples  # noqa: F401  (importable from here as before)
from actcomp.kernels.linear import LINEAR, linear_samples  # noqa: F401
from actcomp.kernels.second_order import SampleFactors
from actcomp.linalg.factors import LowRank, Tucker
from actcomp.optim.roots import statistics_of

__all__ = ["SampleFactors", "conv2d_samples", "factor_samples", "input_samples", "linear_samples", "output_samples"]


def factor_samples(
    family: LayerFamily | str, factors: Tucker | LowRank, geometry: object, weight_shape: torch.Size, bias: bool
) -> SampleFactors:
    """I = L R (with the bias column when ``bias``: L' = [L, 1], R' = [[R, 0], [0, 1]]) of a
    compressed layer's input, from ``family``'s ``second_order.factor_samples`` (``family``: the
    layer's :class:`~actcomp.kernels.LayerFamily`, or a registered family's name). TypeError for
    a family or geometry without second-order statistics and for PatchMeans factors."""
    samples = statistics_of(family, geometry).factor_samples(factors, geometry, weight_shape)
    return samples.with_ones() if bias else samples


def input_samples(x: Tensor, geometry: ConvGeometry | None, weight_shape: torch.Size, bias: bool) -> SampleFactors:
    """I of a plain layer's input x, in full: Linear rows (``geometry`` None, the linear
    family's geometry) or Conv2d patch means (a :class:`ConvGeometry`: padding, group averaging
    and locations as for the factors)."""
    family = LINEAR if geometry is None else CONV
    assert family.second_order is not None
    samples = family.second_order.input_samples(x, geometry, weight_shape)
    return samples.with_ones() if bias else samples


def output_samples(grad_out: Tensor, family: LayerFamily | str, batch_averaged: bool = True) -> Tensor:
    """G (n x C_out) from ``family``'s ``second_order.output_samples``: Linear, the rows of dY;
    Conv2d, dY averaged over the output locations; times the batch size B when the loss is a
    mean over the batch (so that G_j is sample j's own loss gradient)."""
    resolved = family_named(family) if isinstance(family, str) else family
    if resolved.second_order is None:
        raise TypeError(f"the {resolved.name} family has no second-order statistics; supported: {second_order_layers()}")
    rows, batch = resolved.second_order.output_samples(grad_out)
    return rows * batch if batch_averaged else rows
