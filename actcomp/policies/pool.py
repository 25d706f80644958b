"""Pooling that keeps small indices (max) or nothing (average). Exact.

MaxPool: plain autograd keeps the input and int64 flat indices. The backward needs only where
each window's maximum was: here its position within the window, in the smallest unsigned
integer type holding the window size (uint8 up to 256 positions), 1/8 of int64. Backward
rebuilds the flat indices and scatters dY there (overlapping windows add up, as in torch).
AvgPool / AdaptiveAvgPool: the backward is a fixed linear map of dY that needs only the
input's shape; plain autograd keeps the whole input for it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from actcomp.policies.base import NeighbourState, register_neighbour
from actcomp.core.dispatch import mark_kept

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _tuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _index_dtype(positions: int) -> torch.dtype:
    if positions <= 256:
        return torch.uint8
    return torch.int16 if positions <= 32767 else torch.int32


def _window_geometry(out_shape: tuple[int, ...], stride, padding, dilation, kernel, device) -> list[tuple[Tensor, int, int, int]]:
    """Per spatial dim: the window origins of the output positions (broadcastable), stride of
    the dim in the flattened input plane is supplied by the caller."""
    dims = len(out_shape)
    origins = []
    for d in range(dims):
        shape = [1] * dims
        shape[d] = out_shape[d]
        origins.append(((torch.arange(out_shape[d], device=device) * stride[d] - padding[d]).view(shape), dilation[d], kernel[d], d))
    return origins


#: Elements of index arithmetic per chunk: the int64 temporaries of the conversions stay a
#: few MiB instead of several copies of the (int64) index tensor at the step's peak.
_CHUNK = 1 << 20


def _planes_per_chunk(per_plane: int) -> int:
    """How many whole planes of ``per_plane`` elements make about _CHUNK elements (at least 1)."""
    return max(1, _CHUNK // max(per_plane, 1))


def local_indices(flat: Tensor, in_spatial: tuple[int, ...], stride, padding, dilation, kernel) -> Tensor:
    """Flat argmax indices into the input plane -> positions within each window, in the
    smallest integer type (computed in chunks of planes)."""
    out_spatial = tuple(flat.shape[2:])
    geometry = _window_geometry(out_spatial, stride, padding, dilation, kernel, flat.device)
    planes = flat.shape[0] * flat.shape[1]
    flat_planes = flat.reshape(planes, *out_spatial)
    local = torch.empty(flat_planes.shape, dtype=_index_dtype(math.prod(kernel)), device=flat.device)
    step = _planes_per_chunk(math.prod(out_spatial))
    for start in range(0, planes, step):
        rest = flat_planes[start : start + step].clone()
        chunk = torch.zeros_like(rest)
        coords = []
        for size in reversed(in_spatial):
            coords.append(rest % size)
            rest.div_(size, rounding_mode="floor")
        place = 1
        for (origin, dil, k, d), coord in zip(reversed(geometry), coords):  # last spatial dim first
            chunk.add_(coord.sub_(origin).div_(dil, rounding_mode="floor").mul_(place))
            place *= k
        local[start : start + step] = chunk
    return local.view(flat.shape)


def flat_indices(local: Tensor, in_spatial: tuple[int, ...], stride, padding, dilation, kernel) -> Tensor:
    """Positions within windows -> flat indices into the input plane (int64)."""
    out_spatial = tuple(local.shape[2:])
    rest = local.to(torch.int64)
    flat = torch.zeros_like(rest)
    plane = 1
    for (origin, dil, k, d), size in reversed(list(zip(_window_geometry(out_spatial, stride, padding, dilation, kernel, local.device), in_spatial))):
        flat += (origin + (rest % k) * dil) * plane
        rest = rest // k
        plane *= size
    return flat


class SmallIndexMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool) -> Tensor:  # type: ignore[override]
        dims = len(kernel)
        y, flat = _MAX_POOL[dims](x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
        in_spatial = tuple(x.shape[2:])
        local = local_indices(flat, in_spatial, stride, padding, dilation, kernel).contiguous()
        mark_kept("indices", local)
        ctx.save_for_backward(local)
        ctx.geometry = (in_spatial, stride, padding, dilation, kernel)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (local,) = ctx.saved_tensors
        planes = ctx.input_shape[0] * ctx.input_shape[1]
        grad = grad_out.new_zeros(planes, math.prod(ctx.input_shape[2:]))
        # sizes spelled out, not -1: an empty batch (planes 0) has no size to infer
        local, grad_out = local.reshape(planes, 1, *local.shape[2:]), grad_out.reshape(planes, math.prod(grad_out.shape[2:]))
        step = _planes_per_chunk(grad_out.shape[1])
        for start in range(0, planes, step):  # int64 indices of one chunk at a time
            flat = flat_indices(local[start : start + step], *ctx.geometry)
            grad[start : start + step].scatter_add_(1, flat.flatten(1), grad_out[start : start + step])
        return grad.view(ctx.input_shape), None, None, None, None, None


def _batched(x: Tensor, dims: int) -> tuple[Tensor, bool]:
    return (x.unsqueeze(0), True) if x.ndim == dims + 1 else (x, False)


_MAX_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}


@register_neighbour(*_MAX_DIMS)
def max_pool(module: nn.Module, x: Tensor, state: NeighbourState) -> Tensor | None:
    """Max pooling keeping window positions in the smallest integer type."""
    if module.return_indices or not x.requires_grad:
        return None
    dims = next(d for t, d in _MAX_DIMS.items() if isinstance(module, t))
    kernel = _tuple(module.kernel_size, dims)
    stride = _tuple(module.stride if module.stride is not None else module.kernel_size, dims)
    xb, added = _batched(x, dims)
    y = SmallIndexMaxPool.apply(xb, kernel, stride, _tuple(module.padding, dims), _tuple(module.dilation, dims), bool(module.ceil_mode))
    state.keep("indices", x, y.numel() * torch.empty((), dtype=_index_dtype(math.prod(kernel))).element_size())
    return y.squeeze(0) if added else y


class ShapeOnlyPool(torch.autograd.Function):
    """A pooling op whose backward (a fixed linear map of dY) needs only the input's shape."""

    @staticmethod
    def forward(ctx, x: Tensor, pool, backward) -> Tensor:  # type: ignore[override]
        ctx.input_shape, ctx.dtype, ctx.backward_fn = x.shape, x.dtype, backward
        return pool(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        stand_in = grad_out.new_zeros(()).expand(ctx.input_shape)
        return ctx.backward_fn(grad_out.contiguous(), stand_in), None, None


def _avg_functions(module: nn.Module, dims: int):
    """(forward, backward(dY, input stand-in)) of an average pooling module on batched input."""
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        size = module.output_size
        if dims == 1:
            forward = lambda x: F.adaptive_avg_pool2d(x.unsqueeze(2), (1, _tuple(size, 1)[0])).squeeze(2)  # noqa: E731
            backward = lambda g, x: torch.ops.aten._adaptive_avg_pool2d_backward(g.unsqueeze(2), x.unsqueeze(2)).squeeze(2)  # noqa: E731
        elif dims == 2:
            forward = lambda x: F.adaptive_avg_pool2d(x, size)  # noqa: E731
            backward = torch.ops.aten._adaptive_avg_pool2d_backward
        else:
            forward = lambda x: F.adaptive_avg_pool3d(x, size)  # noqa: E731
            backward = torch.ops.aten._adaptive_avg_pool3d_backward
        return forward, backward
    kernel = _tuple(module.kernel_size, dims)
    stride = _tuple(module.stride if module.stride is not None else module.kernel_size, dims)
    padding = _tuple(module.padding, dims)
    ceil, include = bool(module.ceil_mode), bool(module.count_include_pad)
    divisor = getattr(module, "divisor_override", None)
    if dims == 1:
        args2 = ((1, *kernel), (1, *stride), (0, *padding), ceil, include, None)
        forward = lambda x: F.avg_pool2d(x.unsqueeze(2), *args2).squeeze(2)  # noqa: E731
        backward = lambda g, x: torch.ops.aten.avg_pool2d_backward(g.unsqueeze(2), x.unsqueeze(2), *args2).squeeze(2)  # noqa: E731
    elif dims == 2:
        forward = lambda x: F.avg_pool2d(x, kernel, stride, padding, ceil, include, divisor)  # noqa: E731
        backward = lambda g, x: torch.ops.aten.avg_pool2d_backward(g, x, kernel, stride, padding, ceil, include, divisor)  # noqa: E731
    else:
        forward = lambda x: F.avg_pool3d(x, kernel, stride, padding, ceil, include, divisor)  # noqa: E731
        backward = lambda g, x: torch.ops.aten.avg_pool3d_backward(g, x, kernel, stride, padding, ceil, include, divisor)  # noqa: E731
    return forward, backward


_AVG_DIMS = {
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
}


@register_neighbour(*_AVG_DIMS)
def avg_pool(module: nn.Module, x: Tensor, state: NeighbourState) -> Tensor | None:
    """Average pooling keeping nothing (its backward needs only the input's shape)."""
    if not x.requires_grad:
        return None
    dims = next(d for t, d in _AVG_DIMS.items() if isinstance(module, t))
    xb, added = _batched(x, dims)
    forward, backward = _avg_functions(module, dims)
    y = ShapeOnlyPool.apply(xb, forward, backward)
    state.keep("nothing", x, 0)
    return y.squeeze(0) if added else y
