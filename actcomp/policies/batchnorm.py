"""BatchNorm keeping nothing (frozen, eval mode) or factors of its normalised input.

With x_hat = (x - mu) / sigma per channel (mu, sigma the batch statistics in train mode, the
running ones in eval mode), y = gamma x_hat + beta and the means over the batch and spatial
modes written <.>:

* eval mode (running statistics): dX = gamma / sigma dY, which needs nothing of x; only a
  trained gamma needs x_hat (dgamma = sum dY x_hat). Frozen gamma: policy ``nothing`` (exact).
* train mode (batch statistics): dX = gamma / sigma (dY - <dY> - x_hat <dY x_hat>),
  dgamma = sum dY x_hat, dbeta = sum dY. x_hat is kept as Tucker factors at eps (policy
  ``factors``: exact at eps = 1) and rebuilt transiently in backward.

The forward is torch's own (running statistics and num_batches_tracked updated as nn.BatchNorm
does), so outputs are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from actcomp.policies import NeighbourState, register_neighbour
from actcomp.saved_hooks import mark_kept


def _channel(v: Tensor, ndim: int) -> Tensor:
    """A per-channel vector shaped to broadcast against (B, C, *spatial)."""
    return v.view(1, -1, *([1] * (ndim - 2)))


class FactoredBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, batch_stats, momentum, eps, state, keep_x_hat):  # type: ignore[override]
        if batch_stats:
            y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        else:
            y = F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
            mean, invstd = running_mean, torch.rsqrt(running_var + eps)
        tensors = [mean.detach().clone(), invstd.detach().clone()]
        ctx.kind = None
        if keep_x_hat:
            with torch.no_grad():
                x_hat = (x - _channel(mean, x.ndim)) * _channel(invstd, x.ndim)
                factors = state.factor(x_hat.to(x.dtype))
                del x_hat
            ctx.kind, ctx.meta = type(factors), factors.meta()
            tensors += list(factors.tensors())
        else:
            state.keep("nothing", x, 0)
        mark_kept("factors" if keep_x_hat else "nothing", *tensors)
        ctx.save_for_backward(weight, *tensors)
        ctx.batch_stats, ctx.has_bias = batch_stats, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        weight, mean, invstd, *factor_tensors = ctx.saved_tensors
        dims = (0, *range(2, grad_out.ndim))
        n = grad_out.numel() // grad_out.shape[1]
        scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
        x_hat = ctx.kind.from_tensors(tuple(factor_tensors), **ctx.meta).reconstruct().to(grad_out.dtype) if ctx.kind else None
        grad_x = grad_w = grad_b = None
        dy_x_hat = (grad_out * x_hat).sum(dims) if x_hat is not None else None
        if ctx.needs_input_grad[0]:
            if ctx.batch_stats:
                centred = grad_out - _channel(grad_out.sum(dims) / n, grad_out.ndim) - x_hat * _channel(dy_x_hat / n, grad_out.ndim)
                grad_x = centred * _channel(scale.to(grad_out.dtype), grad_out.ndim)
            else:
                grad_x = grad_out * _channel(scale.to(grad_out.dtype), grad_out.ndim)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = dy_x_hat.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dims).to(weight.dtype if weight is not None else grad_out.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


@register_neighbour(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
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
    if keep_x_hat and not (state.approximate and state.neighbours.batchnorm == "factors"):
        return None
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        momentum = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    use_running = not module.training or module.track_running_stats
    running_mean = module.running_mean if use_running else None
    running_var = module.running_var if use_running else None
    return FactoredBatchNorm.apply(x, weight, bias, running_mean, running_var, batch_stats, momentum, module.eps, state, keep_x_hat)
