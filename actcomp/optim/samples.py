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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from actcomp.linalg.factors import LowRank, Tucker
from actcomp.kernels.conv import ConvGeometry
from actcomp.optim.roots import conv2d_parts, conv2d_patch_means, group_mean_channels, tucker_view


@dataclass(frozen=True)
class SampleFactors:
    """Per-sample rows I = left @ right: ``left`` (n x k), ``right`` (k x D), or I = left
    when ``right`` is None (a plain layer's rows, kept in full)."""

    left: Tensor
    right: Tensor | None = None

    @property
    def samples(self) -> int:
        return int(self.left.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.left, self.right) if t is not None)

    def gram(self) -> Tensor:
        """I I^T = L (R R^T) L^T (n x n)."""
        if self.right is None:
            return self.left @ self.left.T
        return self.left @ (self.right @ self.right.T) @ self.left.T

    def squared_norms(self) -> Tensor:
        """||I_j||^2 for every row j, from the k x k Gram R R^T."""
        if self.right is None:
            return (self.left * self.left).sum(1)
        return ((self.left @ (self.right @ self.right.T)) * self.left).sum(1)

    def times_transposed(self, m: Tensor) -> Tensor:
        """I M^T (n x rows of M), as L (R M^T)."""
        if self.right is None:
            return self.left @ m.T
        return self.left @ (self.right @ m.T)

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """W^T I for W (n x m): sum_j W_j^T I_j (m x D), as (W^T L) R."""
        out = weights.T @ self.left
        return out if self.right is None else out @ self.right

    def rows(self, index: Tensor) -> "SampleFactors":
        """The samples ``index`` (R is shared)."""
        return SampleFactors(self.left[index], self.right)

    def with_ones(self) -> "SampleFactors":
        """[I, 1]: the bias column."""
        ones = self.left.new_ones(self.samples, 1)
        if self.right is None:
            return SampleFactors(torch.cat([self.left, ones], dim=1))
        right = torch.block_diag(self.right, self.right.new_ones(1, 1))
        return SampleFactors(torch.cat([self.left, ones], dim=1), right)

    def reconstruct(self) -> Tensor:
        """I itself (tests and diagnostics)."""
        return self.left if self.right is None else self.left @ self.right


def _kron(factors: list[Tensor]) -> Tensor:
    out = factors[0]
    for f in factors[1:]:
        out = torch.kron(out, f)
    return out


def linear_samples(factors: Tucker | LowRank) -> SampleFactors:
    """I = L R of a Linear input (..., C): one row per leading index (module doc)."""
    core, factors_ = tucker_view(factors)
    *leading, u_channel = factors_
    lefts = [
        u if u is not None else torch.eye(int(core.shape[mode]), dtype=core.dtype, device=core.device)
        for mode, u in enumerate(leading)
    ]
    core_rows = core.reshape(-1, core.shape[-1])
    right = core_rows if u_channel is None else core_rows @ u_channel.T
    return SampleFactors(_kron(lefts), right)


def conv2d_samples(factors: Tucker | LowRank, geometry: ConvGeometry, weight_shape: torch.Size) -> SampleFactors:
    """I = L R of a Conv2d input: sample j's patches averaged over the output locations."""
    core, u_batch, u_channel, padded = conv2d_parts(factors, geometry)
    right = conv2d_patch_means(core, u_channel, padded, geometry, weight_shape)
    if u_batch is None:
        return SampleFactors(right)
    return SampleFactors(u_batch, right)


def factor_samples(family: str, factors: Tucker | LowRank, geometry: object, weight_shape: torch.Size, bias: bool) -> SampleFactors:
    """I = L R (with the bias column when ``bias``) of a compressed layer's input."""
    if family == "linear":
        samples = linear_samples(factors)
    elif family == "conv":
        assert isinstance(geometry, ConvGeometry)
        samples = conv2d_samples(factors, geometry, weight_shape)
    else:
        raise TypeError(f"HyLo is implemented for the linear and conv families, got {family!r}")
    return samples.with_ones() if bias else samples


def input_samples(x: Tensor, geometry: ConvGeometry | None, weight_shape: torch.Size, bias: bool) -> SampleFactors:
    """I of a plain layer's input x, in full: Linear rows (``geometry`` None) or Conv2d patch
    means (padding, group averaging and locations as for the factors)."""
    if geometry is None:
        rows = x.reshape(-1, x.shape[-1])
    else:
        if geometry.dims != 2:
            raise TypeError(f"HyLo is implemented for Conv2d and Linear, got a {geometry.dims}-d convolution")
        if x.ndim == 3:
            x = x.unsqueeze(0)
        x, _ = group_mean_channels(x, None, geometry.groups)
        x = F.pad(x, geometry.reversed_pads, mode=geometry.pad_mode)
        kernel = tuple(int(k) for k in weight_shape[2:])
        rows = F.unfold(x, kernel, dilation=geometry.dilation, stride=geometry.stride).mean(2)
    samples = SampleFactors(rows)
    return samples.with_ones() if bias else samples


def output_samples(grad_out: Tensor, family: str, batch_averaged: bool = True) -> Tensor:
    """G (n x C_out): Linear, the rows of dY; Conv2d, dY averaged over the output locations;
    times the batch size B when the loss is a mean over the batch (so that G_j is sample j's
    own loss gradient)."""
    if family == "conv":
        if grad_out.ndim == 3:  # an unbatched input
            grad_out = grad_out.unsqueeze(0)
        rows = grad_out.flatten(2).mean(2)
        batch = grad_out.shape[0]
    else:
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        batch = grad_out.shape[0] if grad_out.ndim > 1 else 1
    return rows * batch if batch_averaged else rows
