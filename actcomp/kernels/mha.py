"""``nn.MultiheadAttention`` whose projections train from factors.

torch's forward passes ``in_proj_weight`` (a parameter of the module itself) and
``out_proj.weight`` to ``F.multi_head_attention_forward``, so the out projection's own forward
(and so a compressed kernel) never runs, and the in-projection keeps the query itself for its
weight gradient. The compressed forward here computes what that function computes for
self-attention with packed projections (torchvision's ViT, ``nn.TransformerEncoderLayer``):

* [q, k, v] = x W_in^T + b_in with x the query (= key = value): the linear family's compressed
  kernel on the module's own state, one factorisation of x shared by q, k and v;
* the attention as plain autograd, as torch writes it: with ``need_weights`` the explicit
  softmax(q k^T / sqrt(d) + mask) (dropout, weights averaged over heads when
  ``average_attn_weights``), else ``F.scaled_dot_product_attention`` (mask, dropout,
  ``is_causal``); ``key_padding_mask`` merged into ``attn_mask`` as torch does;
* out = ``out_proj(o)``: the out projection's own forward, so a compressed ``out_proj`` keeps
  factors of the attention output o.

``batch_first`` either way and unbatched inputs are handled as torch handles them. Everything
else (cross-attention where query is not key, or key is not value; ``kdim``/``vdim`` apart from
``embed_dim``; ``add_bias_kv``; ``add_zero_attn``) runs torch's own forward instead, with a
:class:`~actcomp.core.state.KernelNotRunWarning` naming the layer the first time; its stats
then say policy ``"plain"`` with the bytes plain autograd keeps for the in-projection (its
distinct inputs), never a compression ratio.

The kernel takes the whole call (``takes_call``): ``kernel(module, state, *args, **kwargs)``;
registered for ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actcomp.core.state import KernelNotRunWarning
from actcomp.kernels.base import Registration, base_type, register_kernel
from actcomp.kernels.function import PLAIN, run_layer
from actcomp.kernels.linear import LINEAR

#: How the in-projection runs: the linear family on (in_proj_weight, in_proj_bias).
IN_PROJECTION = Registration(nn.MultiheadAttention, LINEAR, params=lambda m: (m.in_proj_weight, m.in_proj_bias))


def unsupported(module: nn.Module, query: Tensor, key: Tensor, value: Tensor) -> str | None:
    """Why this call has no compressed kernel, in words; None when it has one (packed
    self-attention without bias_k/bias_v or zero attention)."""
    if not module._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v projection weights)"
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv=True"
    if module.add_zero_attn:
        return "add_zero_attn=True"
    if not (query is key and key is value):
        return "it was called with query, key and value not one tensor (cross-attention)"
    return None


def in_projection(module: nn.Module, x: Tensor, state) -> Tensor:
    """x W_in^T + b_in (..., 3E) with the module's compressed linear kernel, or plainly for a
    method that runs linear layers plainly (its stats then say the input was kept)."""
    weight, bias = module.in_proj_weight, module.in_proj_bias
    if state.compressor.runs_plain(LINEAR.layout(None, x)):
        state.record(x, (), x.numel() * x.element_size() if weight.requires_grad else 0)
        return F.linear(x, weight, bias)
    return run_layer(IN_PROJECTION, module, x, state)


def self_attention(
    module: nn.Module,
    state,
    x: Tensor,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` for packed self-attention on x (L, N, E) or (L, E),
    masks already canonical, with the projections as described in the module docstring."""
    is_batched = F._mha_shape_check(x, x, x, key_padding_mask, attn_mask, module.num_heads)
    if not is_batched:
        x = x.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = x.shape
    src_len = tgt_len
    num_heads = module.num_heads
    head_dim = embed_dim // num_heads
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=x.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
            "`generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # SDPA takes the is_causal hint itself
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=x.dtype, check_other=False
        )
        if key_padding_mask is not None:
            is_causal = False  # merged with the padding mask below: no longer causal

    proj = in_projection(module, x, state)
    proj = proj.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    q, k, v = proj[0], proj[1], proj[2]

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(bsz * num_heads, tgt_len, src_len)}."
                )
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

    if key_padding_mask is not None:
        F._check_key_padding_mask(key_padding_mask, src_len, bsz)
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

    dropout_p = module.dropout if module.training else 0.0
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if is_causal and attn_mask is None:
            raise AssertionError("FIXME: is_causal not implemented for need_weights")
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = module.out_proj(out)
        out = out.view(tgt_len, bsz, out.size(1))
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            return out.squeeze(1), weights.squeeze(0)
        return out, weights
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = module.out_proj(out)
    out = out.view(tgt_len, bsz, out.size(1))
    return (out.squeeze(1) if not is_batched else out), None


def _plain(module: nn.Module, state, query: Tensor, key: Tensor, value: Tensor, reason: str, *args, **kwargs) -> tuple[Tensor, Tensor | None]:
    """torch's own forward for a call the kernel does not cover: warned once, recorded as
    policy "plain" with the bytes of the in-projection's distinct inputs."""
    if not state.warned:
        state.warned = True
        warnings.warn(
            f"{state.describe()} runs torch's own forward, not the compressed kernel: {reason}. Its projections keep "
            "their inputs as plain autograd does; leave it out of compress() (layers=...) to silence this",
            KernelNotRunWarning,
            stacklevel=4,
        )
    distinct = {id(t): t for t in (query, key, value)}.values()
    kept = sum(t.numel() * t.element_size() for t in distinct) if module.in_proj_weight is not None and module.in_proj_weight.requires_grad else 0
    state.record(query, (), kept, method=PLAIN)
    return base_type(module).forward(module, query, key, value, *args, **kwargs)


def multihead_attention_kernel(
    module: nn.Module,
    state,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` with its projections from factors (module docstring):
    the same arguments, the same (output, weights) as torch's forward."""
    reason = unsupported(module, query, key, value)
    if reason is not None:
        return _plain(module, state, query, key, value, reason, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
    is_batched = query.dim() == 3
    x = query.transpose(1, 0) if module.batch_first and is_batched else query
    out, weights = self_attention(module, state, x, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
    if module.batch_first and is_batched:
        out = out.transpose(1, 0)
    return out, weights


#: The kernel takes the whole call (``kernel(module, state, *args, **kwargs)``), and calls
#: out_proj's forward where torch's reads its weight.
multihead_attention_kernel.takes_call = True  # type: ignore[attr-defined]
multihead_attention_kernel.runs_children = ("out_proj",)  # type: ignore[attr-defined]
register_kernel(nn.MultiheadAttention)(multihead_attention_kernel)
