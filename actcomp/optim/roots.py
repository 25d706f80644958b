"""KFAC activation factors of Linear and Conv2d layers from the stored factors, as thin roots.

SINGD's (and KFAC's) activation factor of a layer is A = a^T a, where a (n x D) is the layer's
input processed into rows: for Linear the rows of the input (every leading mode a row,
``"expand"``) or the per-sample mean over the leading modes after the batch (``"reduce"``);
for Conv2d the im2col patches (one row per sample and output location, ``"expand"``) or each
sample's patches averaged over the output locations (``"reduce"``), in both cases after the
input channels are averaged over the conv's groups (as SINGD does); a column of ones when the
layer has a bias; then a / sqrt(n). This module computes a root Z with Z Z^T = A from a
``Tucker`` or ``LowRank`` factorisation of the input, never forming the input.

The construction: the rows are a = P Y, where P (n x r) has orthonormal columns and is never
formed, and Y (r x D) is small. For a Tucker input X = S x_0 U_0 x_1 U_1 ... the row modes'
factors are orthonormalised, U_i = Q_i R_i (QR), so P = Q_0 (x) Q_1 ... and the R_i fold into
the core; modes stored without a factor (the modes after the batch of a ``LowRank``) are
identity blocks of P. Then a^T a = Y^T Y. The ones column 1_n = P (P^T 1_n) + r with P^T r = 0,
so [a, 1]^T [a, 1] = Z Z^T with

    Z = [[Y^T, 0], [(P^T 1_n)^T, ||r||]],   ||r||^2 = n - ||P^T 1_n||^2,

exact: the bias row and column of A are those of the reconstructed input. P^T 1_n is the
Kronecker product of the column sums of the Q_i (a vector of ones for an identity block).
Padding (zeros, reflect, replicate, circular) is a linear map on one spatial mode at a time, so
it acts on the spatial factors' rows; im2col of the spatially expanded core gives the conv
rows; the per-location patch mean is, per spatial mode, a (kernel x padded size) averaging
matrix applied to the padded factor.

The family-specific rows live with their family (:attr:`actcomp.kernels.LayerFamily.second_order`:
:func:`actcomp.kernels.linear.linear_rows`, :func:`actcomp.kernels.conv.conv2d_rows`), the shared
algebra in :mod:`actcomp.kernels.second_order`; :func:`kfac_root` asks the registry for the
layer's family. A new family brings its rows in its own file.
"""

from __future__ import annotations

import torch
from torch import Tensor

from actcomp.kernels.base import LayerFamily, SecondOrder, family_named, second_order_layers
from actcomp.kernels.conv import (  # noqa: F401  (the conv rows, importable from here as before)
    conv2d_parts,
    conv2d_patch_means,
    conv2d_rows,
    group_mean_channels,
    output_size,
    padded_factor,
    patch_mean_matrix,
)
from actcomp.kernels.linear import linear_rows  # noqa: F401
from actcomp.kernels.second_order import (  # noqa: F401
    APPROXIMATIONS,
    RowRoot,
    kron_vectors,
    mode_size,
    orthonormal_mode,
)
from actcomp.linalg.factors import LowRank, Tucker


def tucker_view(factors: Tucker | LowRank) -> tuple[Tensor, list[Tensor | None]]:
    """The factors as a core and one factor per mode, None where the mode has no factor.

    A Tucker X = S x_0 U_0 x_1 U_1 ... is (S, [U_0, U_1, ...]); a LowRank X_(0) = L R is
    X = R x_0 L, i.e. (R, [L, None, None, ...]): its other modes are stored in full. Each factor
    type answers for itself (:meth:`actcomp.linalg.factors.Tucker.tucker_view`); one that does
    not determine the input (PatchMeans) raises TypeError.
    """
    return factors.tucker_view()


def statistics_of(family: LayerFamily | str, geometry: object) -> SecondOrder:
    """The second-order statistics of a layer of ``family`` (a family, or a registered family's
    name) with this geometry; TypeError naming the family and the supported layer types when the
    family has none or they do not cover the geometry (a 3-D convolution)."""
    resolved = family_named(family) if isinstance(family, str) else family
    statistics = resolved.second_order
    if statistics is None or not statistics.supports(geometry):
        what = f"the {resolved.name} family" if statistics is None else f"this {resolved.name} layer's geometry"
        raise TypeError(f"{what} has no second-order statistics; supported: {second_order_layers()}")
    return statistics


def kfac_root(
    family: LayerFamily | str,
    factors: Tucker | LowRank,
    geometry: object,
    weight_shape: torch.Size,
    bias: bool,
    approx: str = "expand",
) -> Tensor:
    """Z with Z Z^T = [a, 1]^T [a, 1] / n, a the layer's processed input rows (module doc).

    ``family``: the layer's :class:`~actcomp.kernels.LayerFamily` (or a registered family's
    name, ``"linear"`` or ``"conv"``), whose ``second_order.kfac_rows`` gives a = P Y; then
    Z = [[Y^T, 0], [(P^T 1)^T, sqrt(n - ||P^T 1||^2)]] / sqrt(n) (the last row and column only
    with ``bias``). TypeError for a family or geometry without second-order statistics (a
    3-D convolution) and for factors that do not determine the input (PatchMeans).
    """
    return statistics_of(family, geometry).kfac_rows(factors, geometry, weight_shape, approx).root(bias)

