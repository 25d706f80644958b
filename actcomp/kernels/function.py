"""The one autograd Function behind every compressed layer, whatever its family and method.

Forward: y = family.forward(x, W, b); when W is trained, the layer's method turns x into
factors (:meth:`actcomp.LayerState.compress`) and only those, with W, are saved. A frozen W
saves W alone (dX needs nothing of x). Backward, with dY' = method.filter_grad(dY) (dY itself
for every method but Gradient Filter):

* dX = family.input_grad(dY', W): exact, from the weight alone;
* dW = family.weight_grads[type(factors)](factors, dY'): from the factors, x is never rebuilt;
* db = family.bias_grad(dY).

Never worse than plain: when the factors would take more bytes than x itself (eps near 1,
a small input), the layer keeps x instead for this step (its stats and measure() say policy
``"plain"``) and dW is computed from x as plain autograd computes it. At eps = 1 a stateless
method's factors are full rank, so x is kept without being decomposed.

An empty input (a batch of 0 samples, or any mode of size 0) keeps nothing: dW is zero (a sum
over no samples), dX is empty and db is dY summed, zero; the method is not asked to factor it.

Autocast: the Function runs with autocast off and casts W and b to the dtype autocast would use
inside its forward, so the layer computes what the plain layer computes under autocast while
saving the parameter itself instead of the cast copy plain autocast keeps.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from actcomp.linalg.factors import LowRank
from actcomp.kernels.base import Kernel, LayerFamily, Registration, base_type, registration_for
from actcomp.methods.base import Compressor, InputLayout
from actcomp.core.dispatch import mark_kept
from actcomp.core.state import BackwardRecord, plain_kept_bytes


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a conv/linear on x's device in, or None when it is off."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """t in ``dtype`` (None and non-floating tensors unchanged; no dtype: unchanged)."""
    if t is None or dtype is None or not t.is_floating_point():
        return t
    return t.to(dtype)


@dataclass(frozen=True, eq=False)
class _Call:
    """The non-tensor arguments of one compressed call."""

    family: LayerFamily
    geometry: Any
    layout: InputLayout
    state: Any  # actcomp.core.state.LayerState
    compressor: Compressor
    dtype: torch.dtype | None


#: ``ctx.kind`` of a call that kept its input itself (the factors would have been larger).
PLAIN = "plain"


def keep_input(state: Any, x: Tensor) -> None:
    """Record that a layer kept its input x instead of factors larger than x (never worse
    than plain): its stats say policy ``"plain"``, no ranks, x's bytes (0 when another layer
    already keeps the same x, whose factors it shared)."""
    last = state.last
    kept = 0 if state.shared else x.numel() * x.element_size()
    state.last = dataclasses.replace(last, method=PLAIN, ranks=(), kept_bytes=kept)
    mark_kept(PLAIN, x)  # packers leave it alone; measure reports it as "plain"


def factors_of(state: Any, x: Tensor, layout: InputLayout) -> Any:
    """The layer's factors of x (:meth:`LayerState.compress`), run eagerly under torch.compile:
    the decomposition reads ranks on the host and its shapes differ per layer and step, so
    dynamo would recompile it for each (and hit its recompile limit) to no gain. (The disabled
    wrapper is made on first use while compiling: ``torch.compiler.disable`` imports dynamo.)"""
    if torch.compiler.is_compiling():
        return _eager_factors()(state, x, layout)
    return state.compress(x, layout)


def _factors(state: Any, x: Tensor, layout: InputLayout) -> Any:
    return state.compress(x, layout)


@functools.lru_cache(maxsize=None)
def _eager_factors() -> Any:
    return torch.compiler.disable(_factors)


def full_rank_at_one(call: "_Call") -> bool:
    """True for a stateless method tuned by eps, exact at eps = 1, asked for eps = 1: its
    factors then keep every direction of x (Tucker: a core of x's size and a basis per mode;
    rank-k: both sides at full rank), more bytes than x itself except for an input of exactly
    deficient rank, so the layer keeps x without decomposing it."""
    compressor = call.compressor
    return (
        call.state.config.eps >= 1.0
        and compressor.knob == "eps"
        and compressor.exact_at_one
        and call.state.method_state is None
    )


def plain_weight_grad(family: LayerFamily, x: Tensor, grad: Tensor, weight: Tensor, geometry: Any) -> Tensor:
    """dW from the full input x, as plain autograd computes it: the vector-Jacobian product of
    the family's forward y = f(x, W) with dY, with respect to W (exact for every family and
    padding mode; the layer's forward runs once more, in backward)."""
    with torch.enable_grad():
        w = weight.detach().to(x.dtype).requires_grad_()
        y = family.forward(x.detach(), w, None, geometry)
        (grad_w,) = torch.autograd.grad(y, w, grad.to(y.dtype))
    return grad_w.to(weight.dtype)


def exact_factors(x: Tensor) -> LowRank:
    """x as exact factors for observers that read factors (SINGD, HyLo): I x_0 x, the
    identity on the first mode."""
    return LowRank(torch.eye(x.shape[0], dtype=x.dtype, device=x.device), x)


class CompressedOp(torch.autograd.Function):
    """family.forward(x, W, b) keeping the method's factors of x (not x) for dW."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, call: _Call) -> Tensor:  # type: ignore[override]
        return call.family.forward(x, cast(weight, call.dtype), cast(bias, call.dtype), call.geometry)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, weight, bias, call = inputs
        ctx.call, ctx.input_shape, ctx.has_bias = call, x.shape, bias is not None
        mark_kept("weight", weight)
        ctx.kind = None
        if not weight.requires_grad or x.numel() == 0:
            call.state.record(x, (), 0)
            ctx.save_for_backward(weight)
            return
        if full_rank_at_one(call):
            # eps 1: the factors would hold every singular direction and outweigh x; keep x
            # without decomposing it (no workspace above plain's peak)
            call.state.record(x, (), x.numel() * x.element_size(), method=PLAIN)
            mark_kept(PLAIN, x)
            ctx.kind = PLAIN
            ctx.save_for_backward(weight, x)
            return
        factors = factors_of(call.state, x, call.layout)
        if factors.nbytes > x.numel() * x.element_size():
            keep_input(call.state, x)  # never worse than plain: the factors would outweigh x
            ctx.kind = PLAIN
            ctx.save_for_backward(weight, x)
            return
        if type(factors) not in call.family.weight_grads:
            raise TypeError(
                f"{call.state.describe()}: method {call.compressor.name!r} keeps {type(factors).__name__} "
                f"factors, for which the {call.family.name} kernel has no weight gradient"
            )
        ctx.kind, ctx.meta = type(factors), factors.meta()
        mark_kept("factors", *factors.tensors())
        ctx.save_for_backward(weight, *factors.tensors())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        weight, *saved = ctx.saved_tensors
        call: _Call = ctx.call
        family = call.family
        empty = grad_out.numel() == 0 or ctx.input_shape.numel() == 0
        grad = grad_out if empty else call.compressor.filter_grad(grad_out, call.layout)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = family.input_grad(grad, weight.to(grad.dtype), ctx.input_shape, call.geometry)
        if ctx.needs_input_grad[1] and ctx.kind is None:  # an empty input: a sum over no samples
            grad_w = torch.zeros_like(weight)
        elif ctx.needs_input_grad[1] and ctx.kind is PLAIN:
            (x,) = saved
            grad_w = plain_weight_grad(family, x, grad, weight, call.geometry)
            factors = exact_factors(x) if call.state.observers else None
        elif ctx.needs_input_grad[1]:
            factors = ctx.kind.from_tensors(tuple(saved), **ctx.meta)
            grad_w = family.weight_grads[ctx.kind](factors, grad, weight.shape, call.geometry).to(weight.dtype)
        if ctx.needs_input_grad[1] and ctx.kind is not None:
            if call.state.observers:
                record = BackwardRecord(call.state, family.name, call.geometry, factors, grad, ctx.input_shape, weight.shape)
                for observer in list(call.state.observers):
                    observer(record)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = family.bias_grad(grad_out).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def run_layer(registration: Registration, module: nn.Module, x: Tensor, state: Any) -> Tensor:
    """Run ``module`` on x through its family's functions, keeping factors of x for backward.

    Layers the method leaves exact (``runs_plain``: method ``none``, Gradient Filter on
    Linear) run the module's own forward under plain autograd; their stats say the input was
    kept when the layer is trained (:func:`~actcomp.core.state.plain_kept_bytes`), else nothing.
    """
    family = registration.family
    assert family is not None
    geometry = family.geometry(module)
    given = x
    x, added = family.batch(module, x)
    layout = family.layout(geometry, x)
    compressor: Compressor = state.compressor
    if compressor.runs_plain(layout):
        state.record(given, (), plain_kept_bytes(module, given))
        return base_type(module).forward(module, given)
    else:
        weight, bias = registration.params(module)  # may be computed (a parametrised weight): once
        dtype = autocast_dtype(x)
        x = cast(x, dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = CompressedOp.apply(x, weight, bias, _Call(family, geometry, layout, state, compressor, dtype))
    return y.squeeze(0) if added else y


def kernel_for(module_type: type[nn.Module]) -> Kernel | None:
    """The compressed forward ``kernel(module, x, state) -> y`` of ``module_type``, or None."""
    registration = registration_for(module_type)
    if registration is None:
        return None
    if registration.kernel is not None:
        return registration.kernel
    return lambda module, x, state: run_layer(registration, module, x, state)
