"""Smooth activations with a k-bit derivative (opt-in, approximate): GELU, SiLU, Hardswish,
Sigmoid, Tanh, and transformers' SiLUActivation, GELUActivation, NewGELUActivation and GELUTanh
(by qualified name).

Their backward needs f'(x) at every element; plain autograd keeps x (or f(x)) in full. With
``Neighbours(activations="bits<k>")`` the forward keeps only a k-bit code per element: the
index of the interval of x among 2^k - 1 breakpoints, and backward uses dX = dY * level[code],
a piecewise-constant f'. The breakpoints and levels minimise the expected squared error of f'
for x ~ N(0, 1) (what a BatchNorm before the activation makes of its input, as in "Few-bit
backward", Novikov et al. 2023): for k <= 4 the segmentation is optimal on a grid of [-8, 8]
(dynamic programming over prefix sums), for k = 8 the 255 breakpoints are uniform on [-8, 8].
f' itself is taken by autograd from the activation on the grid, so every variant (GELU's tanh
approximation included) gets its own codebook. The forward output is unchanged.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from actcomp.policies.base import NeighbourState, register_neighbour
from actcomp.policies.bits import save_codes, saved_codes

SMOOTH = (nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh)
_GRID = np.linspace(-8.0, 8.0, 401)


def _derivative_on_grid(fn) -> np.ndarray:
    x = torch.tensor(_GRID, dtype=torch.float64, requires_grad=True)
    # Also when first asked for inside a training step: with grad on, and with pass-through
    # saved-tensor hooks so that measure and count_saved do not see this one-off graph.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad.numpy()


def _optimal_segments(values: np.ndarray, weights: np.ndarray, count: int) -> list[int]:
    """Start indices of ``count`` contiguous segments minimising sum w (v - mean_segment)^2."""
    n = len(values)
    sw = np.concatenate([[0.0], np.cumsum(weights)])
    swv = np.concatenate([[0.0], np.cumsum(weights * values)])
    swv2 = np.concatenate([[0.0], np.cumsum(weights * values**2)])

    def cost(i: np.ndarray, j: int) -> np.ndarray:  # segments [i, j) for a vector of i
        w = sw[j] - sw[i]
        return swv2[j] - swv2[i] - np.where(w > 0, (swv[j] - swv[i]) ** 2 / np.maximum(w, 1e-300), 0.0)

    best = np.full((count + 1, n + 1), np.inf)
    choice = np.zeros((count + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, count + 1):
        for j in range(k, n + 1):
            i = np.arange(k - 1, j)
            total = best[k - 1, i] + cost(i, j)
            at = int(np.argmin(total))
            best[k, j], choice[k, j] = total[at], i[at]
    starts, j = [], n
    for k in range(count, 0, -1):
        j = int(choice[k, j])
        starts.append(j)
    return starts[::-1]


@functools.lru_cache(maxsize=None)
def codebook(function: str, bits: int) -> tuple[Tensor, Tensor]:
    """(breakpoints (2^bits - 1,), levels (2^bits,)) of a k-bit derivative of ``function`` (a key of _FUNCTIONS:
    ``"gelu"``, ``"silu"``, ...)."""
    fn = _FUNCTIONS[function]
    values = _derivative_on_grid(fn)
    weights = np.exp(-(_GRID**2) / 2) + 1e-6
    count = 2**bits
    if bits <= 4:
        starts = _optimal_segments(values, weights, count)
    else:
        starts = list(np.searchsorted(_GRID, np.linspace(-8.0, 8.0, count + 1)[:-1]))
        starts[0] = 0
    bounds = starts + [len(_GRID)]
    levels = [float(np.average(values[a:b], weights=weights[a:b])) if b > a else 0.0 for a, b in zip(bounds[:-1], bounds[1:])]
    breakpoints = [(_GRID[s - 1] + _GRID[s]) / 2 for s in starts[1:]]
    return torch.tensor(breakpoints, dtype=torch.float64), torch.tensor(levels, dtype=torch.float64)


_FUNCTIONS = {
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "hardswish": torch.nn.functional.hardswish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


#: transformers' activation classes (plain nn.Module subclasses, not torch's), registered by
#: qualified name: the function each computes (GELUActivation: erf GELU; NewGELUActivation and
#: GELUTanh: its tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))).
BY_NAME = {
    "transformers.activations.SiLUActivation": "silu",
    "transformers.activations.GELUActivation": "gelu",
    "transformers.activations.NewGELUActivation": "gelu_tanh",
    "transformers.activations.GELUTanh": "gelu_tanh",
}


def _function_name(module: nn.Module) -> str:
    named = BY_NAME.get(f"{type(module).__module__}.{type(module).__qualname__}")
    if named is None:
        base = getattr(type(module), "_actcomp_base", None)  # a swapped module: its own class
        named = BY_NAME.get(f"{base.__module__}.{base.__qualname__}") if base is not None else None
    if named is not None:
        return named
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    for cls, name in ((nn.SiLU, "silu"), (nn.Hardswish, "hardswish"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh")):
        if isinstance(module, cls):
            return name
    raise TypeError(type(module).__name__)


class QuantizedDerivative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, function: str, bits: int, inplace: bool) -> Tensor:  # type: ignore[override]
        breakpoints, levels = codebook(function, bits)
        codes = torch.bucketize(x.detach(), breakpoints.to(x.device, x.dtype))
        save_codes(ctx, codes, bits, f"bits{bits}")
        del codes
        fn = _FUNCTIONS[function]
        y = fn(x)
        if inplace:
            x.copy_(y)
            y = x
            ctx.mark_dirty(x)
        ctx.function = function
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        _, levels = codebook(ctx.function, ctx.bits)
        derivative = levels.to(grad_out.device, grad_out.dtype)[saved_codes(ctx).long()]
        return grad_out * derivative, None, None, None


@register_neighbour(*SMOOTH, *BY_NAME, applies=lambda neighbours: neighbours.activations != "exact")
def quantized(module: nn.Module, x: Tensor, state: NeighbourState) -> Tensor | None:
    """A smooth activation with a k-bit derivative where approximate policies apply."""
    policy = state.neighbours.activations
    if policy == "exact" or not state.approximate or not x.requires_grad or not x.is_floating_point():
        return None
    bits = int(policy[len("bits") :])
    y = QuantizedDerivative.apply(x, _function_name(module), bits, bool(getattr(module, "inplace", False)))
    state.keep(policy, x, math.ceil(x.numel() * bits / 8))
    return y
