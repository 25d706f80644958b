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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from actcomp.linalg.factors import LowRank, Tucker, mode_product
from actcomp.kernels.conv import ConvGeometry

APPROXIMATIONS = ("expand", "reduce")


def tucker_view(factors: Tucker | LowRank) -> tuple[Tensor, list[Tensor | None]]:
    """The factors as a core and one factor per mode, None where the mode has no factor.

    A Tucker X = S x_0 U_0 x_1 U_1 ... is (S, [U_0, U_1, ...]); a LowRank X_(0) = L R is
    X = R x_0 L, i.e. (R, [L, None, None, ...]): its other modes are stored in full.
    """
    if isinstance(factors, Tucker):
        return factors.core, list(factors.factors)
    if isinstance(factors, LowRank):
        return factors.right, [factors.left, *([None] * (factors.right.ndim - 1))]
    raise TypeError(
        f"second-order statistics need Tucker or LowRank factors of the input, got {type(factors).__name__} "
        "(gradient_filter keeps patch means, which do not determine the input): compress this layer with "
        "hosvd, asi or svd, or leave it out of the optimizer"
    )


def mode_size(core: Tensor, factor: Tensor | None, mode: int) -> int:
    """The size of mode ``mode`` of the tensor a (core, factors) pair stands for."""
    return int(core.shape[mode] if factor is None else factor.shape[0])


def orthonormal_mode(core: Tensor, factor: Tensor | None, mode: int) -> tuple[Tensor, Tensor]:
    """Fold the triangular part of a mode's factor into the core: with U = Q R (reduced QR),
    S x_n U = (S x_n R) x_n Q. Returns (S x_n R, Q^T 1), the core and the column sums of the
    orthonormal Q. A mode without a factor is an identity block: (S, ones)."""
    if factor is None:
        return core, core.new_ones(core.shape[mode])
    q, r = torch.linalg.qr(factor)
    return mode_product(core, r, mode), q.sum(0)


def kron_vectors(vectors: list[Tensor]) -> Tensor:
    """v_0 (x) v_1 (x) ... (the first vector varies slowest, as a row-major reshape)."""
    out = vectors[0]
    for v in vectors[1:]:
        out = torch.outer(out, v).reshape(-1)
    return out


@dataclass(frozen=True)
class RowRoot:
    """Processed input rows a = P Y with P (rows x r) orthonormal and never formed.

    ``coefficients`` is Y (r x D); ``ones`` is P^T 1 (r,); ``rows`` is n, the number of rows.
    """

    coefficients: Tensor
    ones: Tensor
    rows: int

    def root(self, bias: bool) -> Tensor:
        """Z (D x r, or D+1 x r+1 with a bias) with Z Z^T = [a, 1]^T [a, 1] / n (the ones
        column only with ``bias``); see the module doc."""
        y = self.coefficients
        z = y.T
        if bias:
            residual = max(float(self.rows) - float(self.ones @ self.ones), 0.0)
            top = torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1)
            last = torch.cat([self.ones, self.ones.new_tensor([math.sqrt(residual)])])
            z = torch.cat([top, last.unsqueeze(0)], dim=0)
        return z / math.sqrt(self.rows)


def _mean_mode(core: Tensor, factor: Tensor | None, mode: int) -> Tensor:
    """The core of the tensor averaged over mode ``mode`` (kept with size 1): S x_n (1^T U / I)."""
    if factor is None:
        return core.mean(mode, keepdim=True)
    return mode_product(core, factor.mean(0, keepdim=True), mode)


def linear_rows(factors: Tucker | LowRank, approx: str = "expand") -> RowRoot:
    """The rows of a Linear layer's input (..., C) as P Y: every leading mode a row
    (``"expand"``), or per sample the mean over the leading modes after the batch (``"reduce"``)."""
    _check_approx(approx)
    core, factors_ = tucker_view(factors)
    *leading, u_channel = factors_
    if approx == "reduce":
        for mode in range(1, len(leading)):
            core = _mean_mode(core, leading[mode], mode)
            leading[mode] = None
    rows, ones = 1, []
    for mode, u in enumerate(leading):
        rows *= mode_size(core, u, mode)
        core, q_ones = orthonormal_mode(core, u, mode)
        ones.append(q_ones)
    core_rows = core.reshape(-1, core.shape[-1])
    y = core_rows if u_channel is None else core_rows @ u_channel.T
    return RowRoot(y, kron_vectors(ones), rows)


def group_mean_channels(core: Tensor, u_channel: Tensor | None, groups: int) -> tuple[Tensor, Tensor | None]:
    """The input's channels averaged over the conv's groups (channel c of group g is channel
    g * C/groups + c): on the channel factor's rows, or on the core when the mode has none."""
    if groups == 1:
        return core, u_channel
    if u_channel is not None:
        return core, u_channel.reshape(groups, -1, u_channel.shape[1]).mean(0)
    shape = core.shape
    return core.reshape(shape[0], groups, shape[1] // groups, *shape[2:]).mean(1), None


def padded_factor(u: Tensor | None, size: int, pad: tuple[int, int], pad_mode: str, like: Tensor) -> Tensor:
    """P u: one spatial mode's padding map applied to the factor's rows (the identity's rows
    when the mode has no factor), (size + pads) x K."""
    if u is None:
        u = torch.eye(size, dtype=like.dtype, device=like.device)
    if pad == (0, 0):
        return u
    return F.pad(u.T.unsqueeze(0), pad, mode=pad_mode)[0].T


def output_size(padded: int, kernel: int, stride: int, dilation: int) -> int:
    """The number of output locations of one spatial mode of a convolution."""
    return (padded - dilation * (kernel - 1) - 1) // stride + 1


def patch_mean_matrix(padded: int, kernel: int, stride: int, dilation: int, like: Tensor) -> Tensor:
    """M (kernel x padded): row k averages, over the output locations o, the padded input's
    entry s*o + d*k that tap k of the kernel reads there."""
    locations = output_size(padded, kernel, stride, dilation)
    taps = torch.arange(kernel, device=like.device).unsqueeze(1) * dilation
    read = taps + torch.arange(locations, device=like.device).unsqueeze(0) * stride  # (kernel, locations)
    m = like.new_zeros(kernel, padded)
    m.scatter_add_(1, read, like.new_full(read.shape, 1.0 / locations))
    return m


def conv2d_parts(factors: Tucker | LowRank, geometry: ConvGeometry) -> tuple[Tensor, Tensor | None, Tensor | None, list[Tensor]]:
    """(core, batch factor, group-averaged channel factor, padded spatial factors) of a Conv2d input."""
    if geometry.dims != 2:
        raise TypeError(f"second-order statistics are implemented for Conv2d and Linear, got a {geometry.dims}-d convolution")
    core, (u_batch, u_channel, *u_spatial) = tucker_view(factors)
    core, u_channel = group_mean_channels(core, u_channel, geometry.groups)
    padded = [
        padded_factor(u, mode_size(core, u, 2 + i), geometry.pads[i], geometry.pad_mode, core)
        for i, u in enumerate(u_spatial)
    ]
    return core, u_batch, u_channel, padded


def conv2d_patch_means(
    core: Tensor, u_channel: Tensor | None, padded: list[Tensor], geometry: ConvGeometry, weight_shape: torch.Size
) -> Tensor:
    """Each (pseudo-)sample's patches averaged over the output locations, (K_B x C/groups*k1*k2),
    from the core with its batch mode left as it is."""
    x = core if u_channel is None else mode_product(core, u_channel, 1)
    for i, p in enumerate(padded):
        m = patch_mean_matrix(p.shape[0], weight_shape[2 + i], geometry.stride[i], geometry.dilation[i], p)
        x = mode_product(x, m @ p, 2 + i)
    return x.reshape(x.shape[0], -1)


def conv2d_rows(factors: Tucker | LowRank, geometry: ConvGeometry, weight_shape: torch.Size, approx: str = "expand") -> RowRoot:
    """The rows of a Conv2d input as P Y: im2col patches, one row per sample and output
    location (``"expand"``), or per sample the patches averaged over the locations
    (``"reduce"``); channels averaged over the groups in both."""
    _check_approx(approx)
    core, u_batch, u_channel, padded = conv2d_parts(factors, geometry)
    batch = mode_size(core, u_batch, 0)
    core, q_ones = orthonormal_mode(core, u_batch, 0)
    if approx == "reduce":
        return RowRoot(conv2d_patch_means(core, u_channel, padded, geometry, weight_shape), q_ones, batch)
    xs = core
    for i, p in enumerate(padded):
        xs = mode_product(xs, p, 2 + i)
    kernel = tuple(int(k) for k in weight_shape[2:])
    cols = F.unfold(xs.contiguous(), kernel, dilation=geometry.dilation, padding=0, stride=geometry.stride)
    rank, channels, locations = xs.shape[0], xs.shape[1], cols.shape[2]
    cols = cols.reshape(rank, channels, -1, locations).permute(0, 3, 1, 2)  # (K_B, L, K_C, taps)
    if u_channel is not None:
        cols = torch.einsum("blkt,ck->blct", cols, u_channel)
    y = cols.reshape(rank * locations, -1)
    ones = torch.kron(q_ones, q_ones.new_ones(locations))
    return RowRoot(y, ones, batch * locations)


def kfac_root(family: str, factors: Tucker | LowRank, geometry: object, weight_shape: torch.Size, bias: bool, approx: str = "expand") -> Tensor:
    """Z with Z Z^T = [a, 1]^T [a, 1] / n, a the layer's processed input rows (module doc),
    for ``family`` ``"linear"`` or ``"conv"`` (2-D)."""
    if family == "linear":
        rows = linear_rows(factors, approx)
    elif family == "conv":
        assert isinstance(geometry, ConvGeometry)
        rows = conv2d_rows(factors, geometry, weight_shape, approx)
    else:
        raise TypeError(f"second-order statistics are implemented for the linear and conv families, got {family!r}")
    return rows.root(bias)


def _check_approx(approx: str) -> None:
    if approx not in APPROXIMATIONS:
        raise ValueError(f"kfac_approx must be one of {', '.join(APPROXIMATIONS)}, got {approx!r}")
