"""LayerNorm and RMSNorm keeping factors of their normalised input (opt-in, approximate), or
their input and per-row statistics (opt-in, exact).

Over the k normalised modes (the last k, N elements per row; mu, r per row, w and b of the
normalised shape, <.> the mean over a row's N elements):

* LayerNorm: x_hat = (x - mu) r with r = 1 / sqrt(var + eps), y = w x_hat + b;
* RMSNorm: x_hat = x r with r = 1 / sqrt(<x^2> + eps), y = w x_hat.

With g = w dY (dY where there is no weight), the backward needs x only through x_hat and r:

    dX = r (g - <g> - x_hat <g x_hat>)      (RMSNorm: without the <g> term)
    dw = sum over rows of dY x_hat,         db = sum over rows of dY.

Plain autograd keeps x, mu and r (LayerNorm), or x, the normalised x and r (torch's RMSNorm on
the CPU, transformers' RMSNorm: float32 copies of both for a bf16 input). With
``Neighbours(norm="factors")`` the forward keeps Tucker factors of x_hat at the neighbours' eps
(policy ``factors``) and mu, r per row exactly (1 / N of x's bytes each); backward rebuilds x_hat
transiently and uses the formulas above. At eps = 1 the gradients equal plain autograd's; at eps
< 1 the error is that of x_hat (every row has unit energy, so eps spends on the rows' shared
directions). Never worse than plain: where the factors would take more bytes than x, x itself is
kept (policy ``plain``) and x_hat made from it in backward. ``norm="exact"`` keeps x and the
statistics everywhere (policy ``plain``, exact: RMSNorm then keeps one tensor of x's size where
plain autograd keeps two; LayerNorm the same bytes as plain). The default ``"keep"`` leaves these
modules to plain autograd, as does autocast (it chooses the norm's dtype itself).

Registered: torch's ``nn.LayerNorm`` and ``nn.RMSNorm``; timm's ``LayerNorm`` and
``LayerNorm2d`` (normalised over the channels of (B, C, H, W)) unless timm's fast-norm path is
on; and the transformers RMSNorm classes whose forward is LLaMA's (checked against it in
tests/policies/test_norm_policy.py): x in float32, x_hat cast back to the input's dtype, then
y = w x_hat, which the kernel reproduces (its backward computes in float32 as autograd does
there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from actcomp.core.dispatch import mark_kept
from actcomp.kernels.function import PLAIN as _PLAIN, keep_input
from actcomp.policies.base import Neighbours, NeighbourState, register_neighbour


@dataclass(frozen=True)
class NormSpec:
    """How a module normalises: over its last ``modes`` modes, subtracting the mean
    (``centered``: LayerNorm) or not (RMSNorm), with ``eps`` (None: torch's RMSNorm default,
    the dtype's machine epsilon); ``upcast``: transformers' RMSNorm (statistics and x_hat in
    float32, x_hat cast back to x's dtype before the weight)."""

    modes: int
    centered: bool
    eps: float | None
    upcast: bool = False


def _accumulation_dtype(x: Tensor, spec: NormSpec) -> torch.dtype:
    """The dtype statistics and backward are computed in: float32 for half types (as torch's
    kernels accumulate) and for transformers' RMSNorm whatever x's dtype, else x's."""
    if spec.upcast or x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def _statistics(x: Tensor, spec: NormSpec) -> tuple[Tensor | None, Tensor]:
    """(mu or None, r) per row, shaped to broadcast against x, in the accumulation dtype."""
    dims = tuple(range(x.ndim - spec.modes, x.ndim))
    h = x.to(_accumulation_dtype(x, spec))
    if spec.centered:
        var, mean = torch.var_mean(h, dim=dims, correction=0, keepdim=True)
        return mean, torch.rsqrt(var + spec.eps)
    eps = torch.finfo(x.dtype).eps if spec.eps is None else spec.eps
    return None, torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + eps)


def _normalised(x: Tensor, mean: Tensor | None, rstd: Tensor, dtype: torch.dtype) -> Tensor:
    """x_hat in ``dtype`` (transformers' RMSNorm, in x's dtype: exactly the tensor its forward
    multiplies by the weight)."""
    h = x.to(rstd.dtype)  # x itself where the dtypes agree: never written to
    return (h - mean).mul_(rstd).to(dtype) if mean is not None else (h * rstd).to(dtype)


def _output(x: Tensor, x_hat: Tensor | None, weight: Tensor | None, bias: Tensor | None, spec: NormSpec) -> Tensor:
    """The module's own forward: torch's layer_norm / rms_norm, or transformers' w * x_hat."""
    shape = list(x.shape[x.ndim - spec.modes :])
    if spec.upcast:
        return weight * x_hat if weight is not None else x_hat
    if spec.centered:
        return F.layer_norm(x, shape, weight, bias, spec.eps)
    return F.rms_norm(x, shape, weight, spec.eps)


def _outweighs(factors, x: Tensor) -> bool:
    """True when the factors take more bytes than x (then x itself is kept)."""
    return factors.nbytes > x.numel() * x.element_size()


class FactoredNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec, state, factored):  # type: ignore[override]
        with torch.no_grad():
            mean, rstd = _statistics(x.detach(), spec)
            x_hat = _normalised(x.detach(), mean, rstd, x.dtype) if factored or spec.upcast else None
            factors = state.factor(x_hat) if factored else None
            if spec.upcast:
                y = _output(x, x_hat, weight, bias, spec)
            del x_hat  # x, x_hat and the factorisation's workspace: the only tensors of x's size
            if not spec.upcast:
                y = _output(x, None, weight, bias, spec)
        # per-row statistics in x's dtype, as torch's CPU kernels keep them (its CUDA kernels: float32)
        stats = [t if spec.upcast else t.to(x.dtype) for t in (mean, rstd) if t is not None]
        if factors is None or _outweighs(factors, x):
            # policy "exact", or never worse than plain: factors larger than x (eps near 1, a small x) -> x
            if factors is None:
                state.keep(_PLAIN, x, x.numel() * x.element_size())
                mark_kept(_PLAIN, x)
            else:
                keep_input(state, x)
            ctx.factors_type, kept = _PLAIN, [x.detach()]
        else:
            ctx.factors_type, ctx.meta = type(factors), factors.meta()
            kept = list(factors.tensors())
        mark_kept(_PLAIN if ctx.factors_type is _PLAIN else "factors", *kept, *stats)  # measure: one policy per row
        ctx.save_for_backward(weight, *stats, *kept)
        ctx.spec, ctx.stats, ctx.has_bias, ctx.x_dtype, ctx.acc = spec, len(stats), bias is not None, x.dtype, rstd.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        weight, *rest = ctx.saved_tensors
        spec: NormSpec = ctx.spec
        stats, kept = rest[: ctx.stats], rest[ctx.stats :]
        stats = [t.to(ctx.acc) for t in stats]
        mean, rstd = (stats[0], stats[1]) if spec.centered else (None, stats[0])
        if ctx.factors_type is _PLAIN:
            x_hat = _normalised(kept[0], mean, rstd, ctx.x_dtype if spec.upcast else rstd.dtype)
        else:
            x_hat = ctx.factors_type.from_tensors(tuple(kept), **ctx.meta).reconstruct().to(ctx.x_dtype)
        rows = tuple(range(grad_out.ndim - spec.modes))
        dims = tuple(range(grad_out.ndim - spec.modes, grad_out.ndim))
        needs = ctx.needs_input_grad
        grad_w = grad_b = grad_x = None
        if weight is not None and needs[1]:
            # transformers: the product w * x_hat in its result's dtype, as autograd's
            product = grad_out * x_hat if spec.upcast else grad_out.to(rstd.dtype) * x_hat.to(rstd.dtype)
            grad_w = product.sum(rows).to(weight.dtype)
            del product
        if ctx.has_bias and needs[2]:
            grad_b = grad_out.sum(rows).to(weight.dtype if weight is not None else grad_out.dtype)
        if needs[0]:
            g = grad_out * weight if weight is not None else grad_out
            g = (g.to(ctx.x_dtype) if spec.upcast else g).to(rstd.dtype)  # transformers: through x_hat's dtype
            x_hat = x_hat.to(rstd.dtype)
            inner = (g * x_hat).mean(dims, keepdim=True)
            # dX = r (g - <g> - x_hat <g x_hat>), written into x_hat's buffer
            grad_x = x_hat.mul_(-inner).add_(g)
            if spec.centered:
                grad_x.sub_(g.mean(dims, keepdim=True))
            grad_x = grad_x.mul_(rstd).to(ctx.x_dtype)
        return grad_x, grad_w, grad_b, None, None, None


def _applies(neighbours: Neighbours) -> bool:
    """Norms are swapped only when their policy is not plain autograd's (opt-in)."""
    return neighbours.norm != "keep"


def _run(x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: NormSpec, state: NeighbourState) -> Tensor | None:
    """The factors policy where it applies (after the first compressed layer), the exact one
    everywhere it is asked for, else None (plain autograd)."""
    policy = state.neighbours.norm
    factored = policy == "factors" and state.approximate
    trains = any(p is not None and p.requires_grad for p in (weight, bias))
    if not (factored or policy == "exact") or not (x.requires_grad or trains):
        return None
    if not x.is_floating_point() or x.ndim <= spec.modes or torch.is_autocast_enabled(x.device.type):
        return None
    return FactoredNorm.apply(x, weight, bias, spec, state, factored)


def _torch_spec(module: nn.Module, x: Tensor, centered: bool) -> NormSpec | None:
    """The spec of a torch LayerNorm / RMSNorm, or None where x does not end in its
    normalised shape (its plain forward then raises torch's own error)."""
    shape = tuple(module.normalized_shape)
    if tuple(x.shape[x.ndim - len(shape) :]) != shape:
        return None
    return NormSpec(len(shape), centered, module.eps)


@register_neighbour(nn.LayerNorm, applies=_applies)
def layer_norm(module: nn.LayerNorm, x: Tensor, state: NeighbourState) -> Tensor | None:
    """nn.LayerNorm keeping factors of x_hat, mean and 1/sigma per row."""
    spec = _torch_spec(module, x, centered=True)
    return _run(x, module.weight, module.bias, spec, state) if spec is not None else None


@register_neighbour(nn.RMSNorm, applies=_applies)
def rms_norm(module: nn.RMSNorm, x: Tensor, state: NeighbourState) -> Tensor | None:
    """nn.RMSNorm keeping factors of x_hat and 1/rms per row."""
    spec = _torch_spec(module, x, centered=False)
    return _run(x, module.weight, None, spec, state) if spec is not None else None


#: timm's LayerNorm (nn.LayerNorm overriding forward for its fast-norm switch) and LayerNorm2d
#: (the same over the channels of (B, C, H, W), through a channels-last view).
TIMM_LAYER_NORM = "timm.layers.norm.LayerNorm"
TIMM_LAYER_NORM_2D = "timm.layers.norm.LayerNorm2d"


@register_neighbour(TIMM_LAYER_NORM, applies=_applies)
def timm_layer_norm(module: nn.LayerNorm, x: Tensor, state: NeighbourState) -> Tensor | None:
    """timm's LayerNorm: the nn.LayerNorm policy unless its fast-norm path is on."""
    return None if getattr(module, "_fast_norm", False) else layer_norm(module, x, state)


@register_neighbour(TIMM_LAYER_NORM_2D, applies=_applies)
def timm_layer_norm_2d(module: nn.LayerNorm, x: Tensor, state: NeighbourState) -> Tensor | None:
    """timm's LayerNorm2d: the nn.LayerNorm policy on x.permute(0, 2, 3, 1), permuted back."""
    if getattr(module, "_fast_norm", False) or x.ndim != 4:
        return None
    y = layer_norm(module, x.permute(0, 2, 3, 1), state)
    return y.permute(0, 3, 1, 2) if y is not None else None


#: transformers' RMSNorm classes whose forward is LLaMA's, character for character:
#: h = x.to(float32); h = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + variance_epsilon);
#: y = weight * h.to(x.dtype). (Gemma's (1 + weight) and Olmo2's float32 product differ.)
TRANSFORMERS_RMS_NORM = tuple(
    f"transformers.models.{package}.modeling_{package}.{cls}RMSNorm"
    for package, cls in (
        ("llama", "Llama"),
        ("mistral", "Mistral"),
        ("mixtral", "Mixtral"),
        ("qwen2", "Qwen2"),
        ("qwen2_moe", "Qwen2Moe"),
        ("qwen3", "Qwen3"),
        ("qwen3_moe", "Qwen3Moe"),
        ("phi3", "Phi3"),
        ("granite", "Granite"),
        ("smollm3", "SmolLM3"),
    )
)


@register_neighbour(*TRANSFORMERS_RMS_NORM, applies=_applies)
def transformers_rms_norm(module: nn.Module, x: Tensor, state: NeighbourState) -> Tensor | None:
    """transformers' LLaMA-family RMSNorm (float32 statistics, x_hat cast back, then w x_hat)."""
    return _run(x, module.weight, None, NormSpec(1, False, module.variance_epsilon, upcast=True), state)
