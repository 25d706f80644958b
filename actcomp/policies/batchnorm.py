"""BatchNorm keeping nothing (frozen, eval mode) or factors of its normalised input.

With x_hat = (x - mu) / sigma per channel (mu, sigma the batch statistics in train mode, the
running ones in eval mode), y = gamma x_hat + beta and the means over the batch and spatial
modes written <.>:

* eval mode (running statistics): dX = gamma / sigma dY, which needs nothing of x; only a
  trained gamma needs x_hat (dgamma = sum dY x_hat). Frozen gamma: policy ``nothing`` (exact).
* train mode (batch statistics): dX = gamma / sigma (dY - <dY> - x_hat <dY x_hat>),
  dgamma = sum dY x_hat, dbeta = sum dY. x_hat is kept as Tucker factors at eps (policy
  ``factors``: exact at eps = 1) and rebuilt transiently in backward, where dX is computed in
  its buffer (dY and x_hat are the only tensors of the input's size alive at once; torch's own
  CPU backward holds a third). ``Neighbours(batchnorm="input")`` keeps factors of x itself
  instead, normalised in backward with the kept mu and sigma (exact at eps = 1 too): x has
  channels of unequal energy and a per-channel mean, so at the same eps it usually takes
  fewer bytes than x_hat, whose channels all have unit variance, and it spends eps on x's
  energy rather than x_hat's (channels of small variance are approximated less well).
  Never worse than plain: where the factors would take more bytes than x (eps near 1, a small
  x), x itself is kept (stats and measure: policy ``plain``) and x_hat made from it in backward.

The forward is torch's own (running statistics and num_batches_tracked updated as nn.BatchNorm
does), so outputs are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from actcomp.policies.base import NeighbourState, register_neighbour
from actcomp.core.dispatch import mark_kept
from actcomp.kernels.function import PLAIN as _PLAIN, keep_input


def _channel(v: Tensor, ndim: int) -> Tensor:
    """A per-channel vector shaped to broadcast against (B, C, *spatial)."""
    return v.view(1, -1, *([1] * (ndim - 2)))


class FactoredBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, batch_stats, momentum, eps, state, keep_x_hat, of_input=False):  # type: ignore[override]
        if batch_stats:
            mean, var = _batch_statistics(x.detach())
            mean, invstd = mean.float() if x.dtype in (torch.float16, torch.bfloat16) else mean, torch.rsqrt(var.to(mean.dtype) + eps)
        else:
            mean, invstd = running_mean.detach().clone(), torch.rsqrt(running_var + eps)
        tensors = [mean.detach(), invstd.detach()]
        ctx.factors_type = None
        if keep_x_hat:
            # x_hat is factored and dropped before the output exists: x, x_hat and the first
            # factorisation step are the only tensors of x's size alive (often the step's peak)
            with torch.no_grad():
                if of_input:  # policy "input": factors of x itself; x_hat is made in backward
                    factors = state.factor(x.detach())
                else:
                    x_hat = x.sub(_channel(mean, x.ndim)).mul_(_channel(invstd, x.ndim))
                    factors = state.factor(x_hat.to(x.dtype))
                    del x_hat
            if factors.nbytes > x.numel() * x.element_size():
                # never worse than plain: factors larger than x (eps near 1, a small x) -> x
                keep_input(state, x)
                ctx.factors_type = _PLAIN
                tensors.append(x.detach())
            else:
                ctx.factors_type, ctx.meta = type(factors), factors.meta()
                mark_kept("factors", *factors.tensors())
                tensors += list(factors.tensors())
        else:
            state.keep("nothing", x, 0)
        # torch's own forward: the same outputs and running statistics as nn.BatchNorm
        y = F.batch_norm(x, running_mean, running_var, weight, bias, batch_stats, momentum, eps)
        mark_kept("factors" if keep_x_hat else "nothing", *tensors[:2])  # mean and 1/sigma
        ctx.save_for_backward(weight, *tensors)
        ctx.batch_stats, ctx.has_bias, ctx.of_input = batch_stats, bias is not None, of_input
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        weight, mean, invstd, *factor_tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dims = (0, *range(2, grad_out.ndim))
        factors_type = ctx.factors_type
        if factors_type is _PLAIN:  # x itself was kept: x_hat made from it as from x's factors
            x_hat = factor_tensors[0].to(grad_out.dtype).clone()
        elif factors_type is not None:
            x_hat = factors_type.from_tensors(tuple(factor_tensors), **ctx.meta).reconstruct().to(grad_out.dtype)
        else:
            x_hat = None
        if x_hat is not None and (ctx.of_input or factors_type is _PLAIN):  # x: normalise in place
            x_hat.sub_(_channel(mean.to(x_hat.dtype), x_hat.ndim)).mul_(_channel(invstd.to(x_hat.dtype), x_hat.ndim))
        sum_dy = grad_out.sum(dims)
        dy_x_hat = _channel_dot(grad_out, x_hat) if x_hat is not None else None
        scale = (invstd if weight is None else weight.to(invstd.dtype) * invstd).to(grad_out.dtype)
        grad_x = grad_w = grad_b = None
        if needs[0] and ctx.batch_stats:
            # dX = scale (dY - <dY> - x_hat <dY x_hat>), written into x_hat's buffer: dY and
            # x_hat are the only tensors of the input's size alive (the step's peak is often here)
            n = grad_out.numel() // grad_out.shape[1]
            c = lambda v: _channel(v, grad_out.ndim)  # noqa: E731
            grad_x = x_hat.mul_(c(-dy_x_hat / n)).add_(grad_out).sub_(c(sum_dy / n)).mul_(c(scale))
        elif needs[0]:
            del x_hat
            grad_x = grad_out * _channel(scale, grad_out.ndim)
        if weight is not None and needs[1]:
            grad_w = dy_x_hat.to(weight.dtype)
        if ctx.has_bias and needs[2]:
            grad_b = sum_dy.to(weight.dtype if weight is not None else grad_out.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


def _batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over the batch and spatial modes, without a
    temporary of x's size: torch's batch-norm statistics kernel (4x faster than var_mean on
    the CPU), or var_mean where a backend has no such kernel."""
    try:
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    except (RuntimeError, NotImplementedError):
        var, mean = torch.var_mean(x, dim=(0, *range(2, x.ndim)), correction=0)
        return mean, var


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum over every mode but the channels' (mode 1) of a * b, one sample at a time (the
    product of a chunk is the only temporary)."""
    dims = tuple(range(1, a.ndim - 1))
    total = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
    for i in range(a.shape[0]):
        total += (a[i] * b[i]).sum(dims)
    return total


def _batch_statistics_used(module: nn.modules.batchnorm._BatchNorm) -> bool:
    """True when the module normalises by batch statistics (train mode, or no running ones):
    its factors policy then approximates, and :func:`actcomp.plan` may trade its eps."""
    return module.training or module.running_mean is None


@register_neighbour(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, tradeable=_batch_statistics_used)
def batchnorm(module: nn.modules.batchnorm._BatchNorm, x: Tensor, state: NeighbourState) -> Tensor | None:
    """BatchNorm keeping nothing when frozen in eval mode, else factors of x_hat (or, where
    approximate policies do not apply or ``batchnorm="keep"``, what plain autograd keeps)."""
    module._check_input_dim(x)
    weight, bias = module.weight, module.bias
    trains = any(p is not None and p.requires_grad for p in (weight, bias))
    if not (x.requires_grad or trains) or not x.is_floating_point():
        return None
    batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    keep_x_hat = batch_stats or (weight is not None and weight.requires_grad)
    if keep_x_hat and not (state.approximate and state.neighbours.batchnorm in ("factors", "input")):
        return None
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        momentum = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    use_running = not module.training or module.track_running_stats
    running_mean = module.running_mean if use_running else None
    running_var = module.running_var if use_running else None
    of_input = state.neighbours.batchnorm == "input"
    return FactoredBatchNorm.apply(x, weight, bias, running_mean, running_var, batch_stats, momentum, module.eps, state, keep_x_hat, of_input)


#: timm's BatchNorm followed by its dropout and activation in one module (efficientnet,
#: mobilenetv3): a BatchNorm2d subclass overriding forward, registered by qualified name.
TIMM_BATCHNORM_ACT = "timm.layers.norm_act.BatchNormAct2d"


@register_neighbour(TIMM_BATCHNORM_ACT, tradeable=_batch_statistics_used)
def batchnorm_act(module: nn.modules.batchnorm._BatchNorm, x: Tensor, state: NeighbourState) -> Tensor | None:
    """timm's ``BatchNormAct2d``: the BatchNorm policy, then the module's own ``drop`` and
    ``act`` children (themselves neighbours with their own policies: a ReLU keeps bits)."""
    y = batchnorm(module, x, state)
    if y is None:
        return None
    return module.act(module.drop(y))
