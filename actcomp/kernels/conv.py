"""Conv1d / Conv2d with compressed activations: every stride, dilation, groups, padding and
padding_mode, with and without bias.

Forward keeps low-rank factors of the input x (B, C, *spatial) instead of x. Backward:

* dX = conv_transpose of dY with W (exact: needs no activation); db = dY summed.
* dW from a Tucker input X ~ S x_B U_B x_C U_C x_1 U_1 ...:
  1. Gb = U_B^T x_B dY: the batch mode folded into dY, K_B pseudo-samples.
  2. Xs = S x_1 (P_1 U_1) x_2 (P_2 U_2): spatial modes expanded, P_i the padding map of
     spatial mode i. Zero, reflect, replicate and circular padding are each a linear map acting
     on one spatial mode at a time, so padding the factor's rows pads the tensor exactly.
  3. Either Z = conv_weight_grad(Xs, Gb) (C_out, K_C, *k) with groups=1, then
     dW[o, c] = sum_k Z[o, k] U_C[c, k] within o's group (einsum 'gokx,gck->gocx'),
     or, when cheaper (grouped and depthwise convs with a large K_C), the channel mode is
     expanded too (Xs x_C U_C) and dW = conv_weight_grad(Xs, Gb) with the layer's groups.
     The choice is by multiply-add count; both are exact for the factors.
* dW from a LowRank input X_(B) ~ L R: dW = conv_weight_grad(pad(R), L^T x_B dY): k
  pseudo-samples instead of B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    record_stats,
    save_for_weight_grad,
    unpack,
)

_CONV = {1: F.conv1d, 2: F.conv2d}


@dataclass(frozen=True)
class ConvGeometry:
    """Everything but the tensors that a convolution's forward and backward need."""

    dims: int
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding: tuple[int, ...] | str
    padding_mode: str
    pads: tuple[tuple[int, int], ...]  # (before, after) per spatial dim

    @staticmethod
    def of(module: nn.Conv1d | nn.Conv2d) -> "ConvGeometry":
        dims = len(module.kernel_size)
        if isinstance(module.padding, str):
            pads = []
            for d, k in zip(module.dilation, module.kernel_size):
                total = 0 if module.padding == "valid" else d * (k - 1)
                pads.append((total // 2, total - total // 2))  # as torch's _ConvNd does for 'same'
        else:
            pads = [(p, p) for p in module.padding]
        return ConvGeometry(
            dims=dims,
            stride=tuple(module.stride),
            dilation=tuple(module.dilation),
            groups=module.groups,
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            padding_mode=module.padding_mode,
            pads=tuple(pads),
        )

    @property
    def symmetric(self) -> bool:
        return all(a == b for a, b in self.pads)

    @property
    def pad_mode(self) -> str:
        """The ``F.pad`` mode of this conv's padding."""
        return "constant" if self.padding_mode == "zeros" else self.padding_mode

    @property
    def reversed_pads(self) -> tuple[int, ...]:
        """The pads in ``F.pad`` order: last spatial dim first."""
        return tuple(p for pair in reversed(self.pads) for p in pair)

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Exactly what the module's forward computes."""
        conv = _CONV[self.dims]
        if self.padding_mode != "zeros":
            x = F.pad(x, self.reversed_pads, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _conv_backward(
    grad_out: Tensor,
    input_or_shape: Tensor | torch.Size,
    weight_or_shape: Tensor | torch.Size,
    geometry: ConvGeometry,
    padding: tuple[int, ...],
    groups: int,
    want_input: bool,
) -> Tensor:
    """One of the two gradients of a convolution, from aten's convolution_backward.

    Only the shape of the tensor whose gradient is not asked for is used, so an empty expanded
    tensor stands in for it.
    """

    def stand_in(t: Tensor | torch.Size) -> Tensor:
        return t if isinstance(t, Tensor) else grad_out.new_empty(1).expand(t)

    grads = torch.ops.aten.convolution_backward(
        grad_out,
        stand_in(input_or_shape),
        stand_in(weight_or_shape),
        None,
        list(geometry.stride),
        list(padding),
        list(geometry.dilation),
        False,
        [0] * geometry.dims,
        groups,
        [want_input, not want_input, False],
    )
    return grads[0] if want_input else grads[1]


def _input_grad(grad_out: Tensor, weight: Tensor, input_shape: torch.Size, g: ConvGeometry) -> Tensor:
    """dX: transposed convolution of dY with W, then the adjoint of the padding."""
    if g.padding_mode == "zeros" and g.symmetric:
        pads = tuple(a for a, _ in g.pads)
        return _conv_backward(grad_out, input_shape, weight, g, pads, g.groups, want_input=True)
    padded = torch.Size(
        (*input_shape[:2], *(n + a + b for n, (a, b) in zip(input_shape[2:], g.pads)))
    )
    grad_padded = _conv_backward(grad_out, padded, weight, g, (0,) * g.dims, g.groups, want_input=True)
    if g.padding_mode == "zeros":
        index = (slice(None), slice(None), *(slice(a, a + n) for n, (a, _) in zip(input_shape[2:], g.pads)))
        return grad_padded[index]
    # Reflect / replicate / circular: the adjoint of F.pad, taken by autograd through F.pad
    # applied to zeros (the padding map is linear, so its vector-Jacobian product needs no data).
    with torch.enable_grad():
        zeros = grad_out.new_zeros(input_shape, requires_grad=True)
        (grad_x,) = torch.autograd.grad(F.pad(zeros, g.reversed_pads, mode=g.padding_mode), zeros, grad_padded)
    return grad_x


def _pad_rows(u: Tensor, pad: tuple[int, int], mode: str) -> Tensor:
    """P u: the padding map of one spatial mode applied to the rows of a factor u (I, K)."""
    if pad == (0, 0):
        return u
    return F.pad(u.T.unsqueeze(0), pad, mode=mode)[0].T


def tucker_weight_grad(
    tucker: Tucker, grad_out: Tensor, weight_shape: torch.Size, g: ConvGeometry, route: str | None = None
) -> Tensor:
    """dW of a convolution whose input is given as a Tucker factorisation (see module doc).

    ``route`` forces ``"contract"`` (Z then U_C, dense in channels) or ``"expand"`` (channel
    mode expanded, grouped weight gradient); by default the one with fewer multiply-adds.
    """
    core, u_batch, u_channel, *u_spatial = tucker.tensors()
    dtype = grad_out.dtype
    gb = _mode_product(grad_out, u_batch.T.to(dtype), 0)  # (K_B, C_out, *out)
    xs = core.to(dtype)
    for i, u in enumerate(u_spatial):
        xs = _mode_product(xs, _pad_rows(u.to(dtype), g.pads[i], g.pad_mode), 2 + i)
    c_out, c_in_group = weight_shape[0], weight_shape[1]
    channels, k_c, k_b = u_channel.shape[0], u_channel.shape[1], u_batch.shape[1]
    taps, out_sites, in_sites = math.prod(weight_shape[2:]), math.prod(gb.shape[2:]), math.prod(xs.shape[2:])
    if route is None:
        contract = c_out * k_c * taps * k_b * out_sites + c_out * c_in_group * k_c * taps
        expand = k_b * k_c * channels * in_sites + c_out * c_in_group * taps * k_b * out_sites
        route = "contract" if contract <= expand else "expand"
    zero_pad = (0,) * g.dims
    if route == "expand":
        xs = _mode_product(xs, u_channel.to(dtype), 1)
        return _conv_backward(gb, xs.contiguous(), weight_shape, g, zero_pad, g.groups, want_input=False)
    if route != "contract":
        raise ValueError(f"route must be 'contract' or 'expand', got {route!r}")
    z = _conv_backward(
        gb, xs.contiguous(), torch.Size((c_out, k_c, *weight_shape[2:])), g, zero_pad, 1, want_input=False
    )
    z = z.reshape(g.groups, c_out // g.groups, k_c, taps)
    u_c = u_channel.to(dtype).reshape(g.groups, c_in_group, k_c)
    return torch.einsum("gokx,gck->gocx", z, u_c).reshape(weight_shape)


def lowrank_weight_grad(lowrank: LowRank, grad_out: Tensor, weight_shape: torch.Size, g: ConvGeometry) -> Tensor:
    """dW of a convolution whose batch-mode unfolding is ``left @ right``: k pseudo-samples."""
    dtype = grad_out.dtype
    gb = _mode_product(grad_out, lowrank.left.T.to(dtype), 0)  # (k, C_out, *out)
    right = lowrank.right.to(dtype)
    if g.padding_mode == "zeros" and g.symmetric:
        padding = tuple(a for a, _ in g.pads)
    else:
        right, padding = F.pad(right, g.reversed_pads, mode=g.pad_mode), (0,) * g.dims
    return _conv_backward(gb, right, weight_shape, g, padding, g.groups, want_input=False)


class CompressedConv(torch.autograd.Function):
    """conv(x, W, b) that keeps low-rank factors of x (not x) for the weight gradient."""

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        geometry: ConvGeometry,
        layer: LayerState,
        dtype: torch.dtype | None,
    ) -> Tensor:
        return geometry.conv(x, cast(weight, dtype), cast(bias, dtype))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, weight, bias, geometry, layer, _ = inputs
        ctx.geometry = geometry
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None

        def kept() -> tuple[Tensor, ...]:
            factors = compress_activation(x, layer)
            ctx.kind = type(factors)
            return factors.tensors()

        save_for_weight_grad(ctx, layer, x, weight, kept)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        weight, *saved = ctx.saved_tensors
        g: ConvGeometry = ctx.geometry
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad_out, weight.to(grad_out.dtype), ctx.input_shape, g)
        if ctx.needs_input_grad[1]:
            factors = unpack(ctx.kind, tuple(saved))
            if isinstance(factors, Tucker):
                grad_w = tucker_weight_grad(factors, grad_out, weight.shape, g)
            else:
                grad_w = lowrank_weight_grad(factors, grad_out, weight.shape, g)
            grad_w = grad_w.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, *range(2, grad_out.ndim))).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None


_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d}


def _patch_mean(t: Tensor, size: tuple[int, ...]) -> Tensor:
    """Means over non-overlapping patches of ``size`` (the last patch of a row may be partial)."""
    return _AVG_POOL[len(size)](t, size, size, ceil_mode=True)


class GradientFilterConv(torch.autograd.Function):
    """Gradient Filter (Yang et al., CVPR 2023), the paper's baseline, for one convolution.

    The output gradient is replaced by its means over r x r patches (piecewise constant). The
    layer keeps its input averaged over the input region of each patch (r*stride per side):
    memory / (r*stride)^2. Backward: dX is the transposed convolution of the filtered gradient
    (exact for it); dW[o, c, i, j] = r^2 sum_{b,p} gbar[b,o,p] xbar[b,c,p] for every tap (i, j),
    the filter's approximation that the input is constant within a patch; db = sum dY.
    """

    @staticmethod
    def forward(x, weight, bias, geometry, layer, dtype, patch):  # type: ignore[override]
        return geometry.conv(x, cast(weight, dtype), cast(bias, dtype))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, weight, bias, geometry, layer, _, patch = inputs
        ctx.geometry, ctx.input_shape, ctx.has_bias, ctx.patch = geometry, x.shape, bias is not None, patch

        def kept() -> tuple[Tensor, ...]:
            with torch.no_grad():
                pooled = _patch_mean(x.detach(), tuple(patch * s for s in geometry.stride)).contiguous()
            record_stats(layer, x, (), pooled.numel() * pooled.element_size())
            return (pooled,)

        save_for_weight_grad(ctx, layer, x, weight, kept)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        weight, *saved = ctx.saved_tensors
        g: ConvGeometry = ctx.geometry
        size = (ctx.patch,) * g.dims
        means = _patch_mean(grad_out, size)  # (B, O, *patches)
        filtered = means
        for d in range(g.dims):
            filtered = filtered.repeat_interleave(ctx.patch, dim=2 + d)
        filtered = filtered[(slice(None), slice(None), *(slice(0, n) for n in grad_out.shape[2:]))]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(filtered.contiguous(), weight.to(grad_out.dtype), ctx.input_shape, g)
        if ctx.needs_input_grad[1]:
            (pooled,) = saved
            sites = tuple(min(a, b) for a, b in zip(means.shape[2:], pooled.shape[2:]))
            crop = (slice(None), slice(None), *(slice(0, n) for n in sites))
            gbar, xbar = means[crop].flatten(2), pooled[crop].to(grad_out.dtype).flatten(2)
            c_out, c_group = weight.shape[0], weight.shape[1]
            batch = gbar.shape[0]
            gbar = gbar.reshape(batch, g.groups, c_out // g.groups, -1)
            xbar = xbar.reshape(batch, g.groups, c_group, -1)
            per_channel = torch.einsum("bgop,bgcp->goc", gbar, xbar).reshape(c_out, c_group) * ctx.patch**g.dims
            grad_w = per_channel.reshape(c_out, c_group, *(1,) * g.dims).expand(weight.shape).to(weight.dtype).contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, *range(2, grad_out.ndim))).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


@register_kernel(nn.Conv1d, nn.Conv2d)
def conv_kernel(module: nn.Conv1d | nn.Conv2d, x: Tensor, layer: LayerState) -> Tensor:
    """Run ``module`` on x keeping factors of x for backward (see the module doc for the math)."""
    unbatched = x.ndim == len(module.kernel_size) + 1
    if unbatched:
        x = x.unsqueeze(0)
    dtype = autocast_dtype(x)
    x = cast(x, dtype)
    geometry = ConvGeometry.of(module)
    with torch.autocast(x.device.type, enabled=False):
        if layer.config.method == "gradient_filter":
            y = GradientFilterConv.apply(x, module.weight, module.bias, geometry, layer, dtype, layer.config.patch)
        else:
            y = CompressedConv.apply(x, module.weight, module.bias, geometry, layer, dtype)
    return y.squeeze(0) if unbatched else y
