"""torchvision's Swin attention (``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2``):
a forward that calls its ``qkv`` and ``proj`` Linear layers, so that they train from factors.

torchvision's forward passes ``self.qkv.weight`` and ``self.proj.weight`` to the functional
``shifted_window_attention``, so the two Linear layers' own forwards (and so their compressed
kernels) never run. The compressed forward here computes what that function computes, step for
step (padding to whole windows, cyclic shift, window partition, scaled or cosine attention with
the relative position bias and the shift mask, softmax, dropout, reverse), with
``F.linear(x, qkv.weight, qkv.bias)`` replaced by ``qkv(x)`` and the same for ``proj``: a
compressed ``qkv`` keeps factors of the window tokens x (B*nW, Ws*Ws, C) and a compressed
``proj`` factors of the attention output; everything else is plain autograd, as before.

V2 zeroes the key part of the qkv bias inside the function (``b[C:2C] = 0`` on a copy), so that
part neither enters the output nor receives a gradient. Calling ``qkv(x)`` adds the whole bias;
:class:`WithoutKeyBias` subtracts the key part again and gives it the negated gradient, the
same column sums the Linear kernel adds, so they cancel to exactly zero. (V2 keeps that part of
the parameter at zero from its construction on, so the forward is bit for bit torchvision's.)

The attention module's own parameters (V1's relative position bias table, V2's logit scale and
``cpb_mlp``, whose Linear layers run their own forwards) need nothing of x: its own stats entry
(method ``"parent"``) keeps 0 bytes, its projections are listed as layers of their own.
Registered by qualified name (actcomp does not import torchvision).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actcomp.kernels.base import register_kernel
from actcomp.kernels.linear import linear_bias_grad

SHIFTED_WINDOW_ATTENTION = "torchvision.models.swin_transformer.ShiftedWindowAttention"
SHIFTED_WINDOW_ATTENTION_V2 = "torchvision.models.swin_transformer.ShiftedWindowAttentionV2"

#: ``stats()`` method of an attention module whose own parameters need nothing of its input
#: (its projections are layers of their own).
PARENT = "parent"


class WithoutKeyBias(torch.autograd.Function):
    """y - [0, b_k, 0]: the qkv output without the key part of its bias (Swin V2).

    Forward: the columns C..2C of y (..., 3C) minus b[C:2C]; backward: dY passes unchanged, and
    db = -[0, sum(dY_k), 0] with the column sums computed as the linear kernel's db is, so the
    key part of the bias gets exactly zero gradient in all."""

    @staticmethod
    def forward(y: Tensor, bias: Tensor) -> Tensor:  # type: ignore[override]
        length = bias.numel() // 3
        out = y.clone()
        out[..., length : 2 * length] -= bias[length : 2 * length]
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.length = inputs[1].numel() // 3

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_bias = None
        if ctx.needs_input_grad[1]:
            sums = linear_bias_grad(grad_out)
            grad_bias = torch.zeros_like(sums)
            grad_bias[ctx.length : 2 * ctx.length] = -sums[ctx.length : 2 * ctx.length]
        return grad_out, grad_bias


def _shift_mask(x: Tensor, pad_h: int, pad_w: int, window_size: list[int], shift_size: list[int], num_windows: int) -> Tensor:
    """The (nW, N, N) mask of torchvision's shifted windows: -100 between tokens that come from
    different regions of the unshifted map, 0 within one."""
    attn_mask = x.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            attn_mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    attn_mask = attn_mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
    attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
    attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))


def window_attention(
    input: Tensor,  # noqa: A002  (torchvision's name)
    qkv: Callable[[Tensor], Tensor],
    proj: Callable[[Tensor], Tensor],
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    key_bias: Tensor | None = None,
    logit_scale: Tensor | None = None,
    training: bool = True,
) -> Tensor:
    """torchvision's ``shifted_window_attention`` with the projections as callables.

    For x (B, H, W, C) padded to whole windows, cyclically shifted by ``shift_size`` and cut
    into windows of N = Ws_h * Ws_w tokens: [q, k, v] = qkv(x); attention
    A = softmax(q k^T / sqrt(C / heads) + bias + mask) (V1), or with ``logit_scale`` the cosine
    form A = softmax(normalize(q) normalize(k)^T * exp(min(s, log 100)) + bias + mask) (V2,
    ``key_bias`` being qkv's bias, whose key part is left out: :class:`WithoutKeyBias`);
    out = proj(dropout(A) v), windows put back, shift undone, padding cut. Dropout (attention
    and output) as ``F.dropout`` with ``training``.
    """
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape

    shift_size = shift_size.copy()
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))

    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)

    projected = qkv(x)
    if logit_scale is not None and key_bias is not None:
        projected = WithoutKeyBias.apply(projected, key_bias)
    projected = projected.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = projected[0], projected[1], projected[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * (C // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias

    if sum(shift_size) > 0:
        attn_mask = _shift_mask(x, pad_H, pad_W, window_size, shift_size, num_windows)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))

    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)

    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = proj(x)
    x = F.dropout(x, p=dropout, training=training)

    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def _run(module: nn.Module, x: Tensor, state, logit_scale: Tensor | None) -> Tensor:
    state.record(x, (), 0, method=PARENT)
    return window_attention(
        x,
        module.qkv,
        module.proj,
        module.get_relative_position_bias(),
        module.window_size,
        module.num_heads,
        shift_size=module.shift_size,
        attention_dropout=module.attention_dropout,
        dropout=module.dropout,
        key_bias=module.qkv.bias if logit_scale is not None else None,
        logit_scale=logit_scale,
        training=module.training,
    )


def shifted_window_attention_kernel(module: nn.Module, state, x: Tensor) -> Tensor:
    """Swin V1's attention calling its ``qkv`` and ``proj`` layers (:func:`window_attention`)."""
    return _run(module, x, state, None)


def shifted_window_attention_v2_kernel(module: nn.Module, state, x: Tensor) -> Tensor:
    """Swin V2's cosine attention calling its ``qkv`` and ``proj`` layers (:func:`window_attention`)."""
    return _run(module, x, state, module.logit_scale)


# The kernels take the whole call (``kernel(module, state, x)``), so that they run, and call
# qkv's and proj's forwards, under every method (also one that runs linear layers plainly: the
# projections then run plainly themselves); and they call those forwards where torchvision's
# reads the weights (``compress(sample=...)`` then selects them with their parent).
for _kernel in (shifted_window_attention_kernel, shifted_window_attention_v2_kernel):
    _kernel.takes_call = True  # type: ignore[attr-defined]
    _kernel.runs_children = ("qkv", "proj")  # type: ignore[attr-defined]
register_kernel(SHIFTED_WINDOW_ATTENTION)(shifted_window_attention_kernel)
register_kernel(SHIFTED_WINDOW_ATTENTION_V2)(shifted_window_attention_v2_kernel)
