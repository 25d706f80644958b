"""The convolution family: Conv1d / Conv2d / Conv3d with compressed activations, every stride,
dilation, groups, padding and padding_mode, with and without bias.

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
* dW from PatchMeans (Gradient Filter): see :func:`patch_weight_grad`.

Second-order statistics (:class:`~actcomp.kernels.base.SecondOrder`, 2-D convolutions): the
rows a are the im2col patches, one per sample and output location (``"expand"``), or each
sample's patches averaged over the locations (``"reduce"``, and HyLo's per-sample rows I), the
input channels averaged over the groups first (as SINGD does). From the factors: the padding
map acts on the spatial factors' rows, im2col of the spatially expanded core gives the patches,
and the per-location patch mean is, per spatial mode, a (kernel x padded size) averaging matrix
applied to the padded factor. The export's kernels (:class:`~actcomp.kernels.base.ExportKernels`:
dense or depthwise 2-D, integer zero padding) use forward and transposed convolutions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actcomp.linalg.factors import LowRank, PatchMeans, Tucker, mode_product
from actcomp.kernels.base import ExportKernels, LayerFamily, SecondOrder, register_layer
from actcomp.kernels.second_order import RowRoot, SampleFactors, check_approx, mode_size, orthonormal_mode
from actcomp.methods.base import InputLayout
from actcomp.methods.gradient_filter import patch_means

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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
    def of(module: nn.Module) -> "ConvGeometry":
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


def _expanded_in_layout(core: Tensor, modes: list[tuple[int, Tensor]]) -> Tensor:
    """core x_n M_n for each (n, M_n) in turn, every product a matrix multiply of a contiguous
    view that keeps the modes in place: the last mode as (rest, K) M^T, any other as
    M (before, K, after) batched over ``before``; no copy into a permuted layout (tensordot's
    mode product copies the tensor in and out of one at every step: on the depthwise benchmark
    shapes the expansion took about twice as long)."""
    xs = core
    for mode, m in modes:
        shape = xs.shape
        size, after = shape[mode], math.prod(shape[mode + 1 :])
        if after == 1:
            xs = xs.reshape(-1, size) @ m.T
        else:
            xs = torch.matmul(m, xs.reshape(math.prod(shape[:mode]), size, after))
        xs = xs.reshape(*shape[:mode], m.shape[0], *shape[mode + 1 :])
    return xs


def tucker_weight_grad(
    tucker: Tucker, grad_out: Tensor, weight_shape: torch.Size, g: ConvGeometry, route: str | None = None
) -> Tensor:
    """dW of a convolution whose input is given as a Tucker factorisation (see module doc).

    ``route`` forces ``"contract"`` (Z then U_C, dense in channels) or ``"expand"`` (channel
    mode expanded, grouped weight gradient); by default the one with fewer multiply-adds.
    """
    core, u_batch, u_channel, *u_spatial = tucker.tensors()
    dtype = grad_out.dtype
    gb = mode_product(grad_out, u_batch.T.to(dtype), 0)  # (K_B, C_out, *out)
    padded = [_pad_rows(u.to(dtype), g.pads[i], g.pad_mode) for i, u in enumerate(u_spatial)]
    c_out, c_in_group = weight_shape[0], weight_shape[1]
    channels, k_c, k_b = u_channel.shape[0], u_channel.shape[1], u_batch.shape[1]
    taps, out_sites, in_sites = math.prod(weight_shape[2:]), math.prod(gb.shape[2:]), math.prod(p.shape[0] for p in padded)
    if route is None:
        contract = c_out * k_c * taps * k_b * out_sites + c_out * c_in_group * k_c * taps
        expand = k_b * k_c * channels * in_sites + c_out * c_in_group * taps * k_b * out_sites
        route = "contract" if contract <= expand else "expand"
    zero_pad = (0,) * g.dims
    if route == "expand":  # the channel mode first (on the core), then the spatial modes, last first
        modes = [(1, u_channel.to(dtype))] + [(2 + i, padded[i]) for i in reversed(range(len(padded)))]
        xs = _expanded_in_layout(core.to(dtype), modes)
        return _conv_backward(gb, xs, weight_shape, g, zero_pad, g.groups, want_input=False)
    if route != "contract":
        raise ValueError(f"route must be 'contract' or 'expand', got {route!r}")
    xs = core.to(dtype)
    for i, p in enumerate(padded):
        xs = mode_product(xs, p, 2 + i)
    z = _conv_backward(
        gb, xs.contiguous(), torch.Size((c_out, k_c, *weight_shape[2:])), g, zero_pad, 1, want_input=False
    )
    z = z.reshape(g.groups, c_out // g.groups, k_c, taps)
    u_c = u_channel.to(dtype).reshape(g.groups, c_in_group, k_c)
    return torch.einsum("gokx,gck->gocx", z, u_c).reshape(weight_shape)


def tucker_weight_grad_by_convolution(tucker: Tucker, grad_out: Tensor, weight_shape: torch.Size, g: ConvGeometry) -> Tensor:
    """The same dW as :func:`tucker_weight_grad`, with forward convolutions only (for graph
    exporters without convolution_backward, e.g. ONNX): dense or depthwise 2-D convolutions
    (a channel multiplier allowed) with zero padding.

    The batch factor is folded into dY (K_B pseudo-samples), the spatial factors expanded
    through the zero padding and the channel factor expanded, giving Xs (K_B, C, Hp, Wp). Then
    dW[o, c] = sum_b Xs[b, c] (*) Gb[b, o] is a convolution of Xs with channels as the batch and
    the pseudo-samples as input channels, by Gb as the weight, stride and dilation swapped
    (one group per channel for a depthwise layer), cropped to the kernel size.
    """
    if g.dims != 2 or g.padding_mode != "zeros" or not g.symmetric:
        raise ValueError("tucker_weight_grad_by_convolution needs a 2-D convolution with symmetric zero padding")
    core, u_batch, u_channel, u_h, u_w = tucker.tensors()
    gb = mode_product(grad_out, u_batch.T, 0)  # (K_B, C_out, H', W')
    xs = mode_product(core, _pad_rows(u_h, g.pads[0], "constant"), 2)
    xs = mode_product(xs, _pad_rows(u_w, g.pads[1], "constant"), 3)
    xs = mode_product(xs, u_channel, 1)  # (K_B, C, Hp, Wp)
    rank, channels = xs.shape[0], xs.shape[1]
    c_out, kh, kw = weight_shape[0], weight_shape[2], weight_shape[3]
    if g.groups == 1:
        grad_w = F.conv2d(xs.transpose(0, 1), gb.transpose(0, 1), None, g.dilation, 0, g.stride).transpose(0, 1)
    elif g.groups == channels and weight_shape[1] == 1:
        grad_w = F.conv2d(
            xs.transpose(0, 1).reshape(1, channels * rank, *xs.shape[2:]), gb.transpose(0, 1), None, g.dilation, 0, g.stride, channels
        )
        grad_w = grad_w.reshape(c_out, 1, *grad_w.shape[2:])
    else:
        raise ValueError(f"tucker_weight_grad_by_convolution supports dense or depthwise convolutions, got groups={g.groups}")
    return grad_w[:, :, :kh, :kw]


def lowrank_weight_grad(lowrank: LowRank, grad_out: Tensor, weight_shape: torch.Size, g: ConvGeometry) -> Tensor:
    """dW of a convolution whose batch-mode unfolding is ``left @ right``: k pseudo-samples."""
    dtype = grad_out.dtype
    gb = mode_product(grad_out, lowrank.left.T.to(dtype), 0)  # (k, C_out, *out)
    right = lowrank.right.to(dtype)
    if g.padding_mode == "zeros" and g.symmetric:
        padding = tuple(a for a, _ in g.pads)
    else:
        right, padding = F.pad(right, g.reversed_pads, mode=g.pad_mode), (0,) * g.dims
    return _conv_backward(gb, right, weight_shape, g, padding, g.groups, want_input=False)


def patch_weight_grad(pooled: PatchMeans, grad_out: Tensor, weight_shape: torch.Size, g: ConvGeometry) -> Tensor:
    """Gradient Filter's dW from the input's region means xbar and dY (already patch-filtered):
    dW[o, c, taps] = r^d sum_{b,p} gbar[b,o,p] xbar[b,c,p] within o's group, the same on every
    tap (the filter's assumption that the input is constant within a patch)."""
    patch = tuple(r // s for r, s in zip(pooled.region, g.stride))
    means = patch_means(grad_out, patch)  # (B, O, *patches)
    sites = tuple(min(a, b) for a, b in zip(means.shape[2:], pooled.means.shape[2:]))
    crop = (slice(None), slice(None), *(slice(0, n) for n in sites))
    gbar, xbar = means[crop].flatten(2), pooled.means[crop].to(grad_out.dtype).flatten(2)
    c_out, c_group = weight_shape[0], weight_shape[1]
    batch = gbar.shape[0]
    gbar = gbar.reshape(batch, g.groups, c_out // g.groups, -1)
    xbar = xbar.reshape(batch, g.groups, c_group, -1)
    per_channel = torch.einsum("bgop,bgcp->goc", gbar, xbar).reshape(c_out, c_group) * math.prod(patch)
    return per_channel.reshape(c_out, c_group, *(1,) * g.dims).expand(weight_shape).contiguous()


def conv_bias_grad(grad_out: Tensor) -> Tensor:
    """db = dY summed over the batch and spatial modes."""
    return grad_out.sum(dim=(0, *range(2, grad_out.ndim)))


def _conv_batch(module: nn.Module, x: Tensor) -> tuple[Tensor, bool]:
    """An unbatched input (C, *spatial) gets a batch mode of 1."""
    if x.ndim == len(module.kernel_size) + 1:
        return x.unsqueeze(0), True
    return x, False


def input_grad_by_transposed_convolution(grad_out: Tensor, weight: Tensor, input_shape: torch.Size, g: ConvGeometry) -> Tensor:
    """dX of a 2-D convolution with symmetric zero padding by ``conv_transpose2d`` (graph
    exportable): the output padding restores the input rows and columns a stride skips."""
    (sh, sw), ((ph, _), (pw, _)), (dh, dw) = g.stride, g.pads, g.dilation
    kh, kw = weight.shape[2:]
    height, width = input_shape[2:]
    extra_h = height - ((grad_out.shape[2] - 1) * sh - 2 * ph + dh * (kh - 1) + 1)
    extra_w = width - ((grad_out.shape[3] - 1) * sw - 2 * pw + dw * (kw - 1) + 1)
    return F.conv_transpose2d(grad_out, weight, None, g.stride, (ph, pw), (extra_h, extra_w), g.groups, g.dilation)


def export_unsupported(g: ConvGeometry, weight_shape: torch.Size) -> str | None:
    """What the export's conv kernels support, in words, when this layer is not among it (else
    None): 2-D, integer zero padding, dense or depthwise (one input channel per group, a
    channel multiplier allowed: weight (C_out, 1, kh, kw))."""
    if g.dims != 2:
        return "2-D convolutions (Conv2d)"
    if g.padding_mode != "zeros" or isinstance(g.padding, str):
        return "zero padding given as integers"
    if g.groups != 1 and weight_shape[1] != 1:
        return "dense (groups=1) or depthwise convolutions"
    return None


# -- second-order statistics (2-D) ------------------------------------------------------------


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
    return _pad_rows(u, pad, pad_mode)


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
    core, (u_batch, u_channel, *u_spatial) = factors.tucker_view()
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
    from the core with its batch mode left as it is: x = S x_C U_C x_i (M_i P_i U_i)."""
    x = core if u_channel is None else mode_product(core, u_channel, 1)
    for i, p in enumerate(padded):
        m = patch_mean_matrix(p.shape[0], weight_shape[2 + i], geometry.stride[i], geometry.dilation[i], p)
        x = mode_product(x, m @ p, 2 + i)
    return x.reshape(x.shape[0], -1)


def conv2d_rows(factors: Tucker | LowRank, geometry: ConvGeometry, weight_shape: torch.Size, approx: str = "expand") -> RowRoot:
    """The rows a of a Conv2d input as P Y: im2col patches, one row per sample and output
    location (``"expand"``: P = Q_B (x) I_locations), or per sample the patches averaged over
    the locations (``"reduce"``: P = Q_B); channels averaged over the groups in both."""
    check_approx(approx)
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


def conv2d_samples(factors: Tucker | LowRank, geometry: ConvGeometry, weight_shape: torch.Size) -> SampleFactors:
    """I = L R of a Conv2d input: sample j's patches averaged over the output locations,
    L = U_B, R = the patch means of the core (:func:`conv2d_patch_means`)."""
    core, u_batch, u_channel, padded = conv2d_parts(factors, geometry)
    right = conv2d_patch_means(core, u_channel, padded, geometry, weight_shape)
    if u_batch is None:
        return SampleFactors(right)
    return SampleFactors(u_batch, right)


def conv2d_input_samples(x: Tensor, geometry: ConvGeometry, weight_shape: torch.Size) -> SampleFactors:
    """I of a plain Conv2d input x, in full: each sample's patches averaged over the output
    locations (padding and group averaging as for the factors)."""
    if geometry.dims != 2:
        raise TypeError(f"HyLo is implemented for Conv2d and Linear, got a {geometry.dims}-d convolution")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    x, _ = group_mean_channels(x, None, geometry.groups)
    x = F.pad(x, geometry.reversed_pads, mode=geometry.pad_mode)
    kernel = tuple(int(k) for k in weight_shape[2:])
    return SampleFactors(F.unfold(x, kernel, dilation=geometry.dilation, stride=geometry.stride).mean(2))


def conv_output_samples(grad_out: Tensor) -> tuple[Tensor, int]:
    """(G, B): dY averaged over the output locations, one row per sample, and the batch size."""
    if grad_out.ndim == 3:  # an unbatched input
        grad_out = grad_out.unsqueeze(0)
    return grad_out.flatten(2).mean(2), grad_out.shape[0]


CONV = LayerFamily(
    name="conv",
    geometry=lambda module: ConvGeometry.of(module),
    layout=lambda g, x: InputLayout(sample_modes=1, stride=g.stride),
    forward=lambda x, weight, bias, g: g.conv(x, weight, bias),
    input_grad=lambda grad_out, weight, input_shape, g: _input_grad(grad_out, weight, input_shape, g),
    bias_grad=conv_bias_grad,
    weight_grads={Tucker: tucker_weight_grad, LowRank: lowrank_weight_grad, PatchMeans: patch_weight_grad},
    batch=_conv_batch,
    second_order=SecondOrder(
        layers="Conv2d",
        kfac_rows=conv2d_rows,
        factor_samples=conv2d_samples,
        input_samples=conv2d_input_samples,
        output_samples=conv_output_samples,
        supports=lambda g: g.dims == 2,
    ),
    export=ExportKernels(
        layers="Conv2d",
        forward=lambda x, weight, bias, g: g.conv(x, weight, bias),
        input_grad=input_grad_by_transposed_convolution,
        weight_grads={Tucker: tucker_weight_grad_by_convolution},
        unsupported=export_unsupported,
    ),
)

register_layer(nn.Conv1d, nn.Conv2d, nn.Conv3d, family=CONV)
