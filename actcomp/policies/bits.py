"""Packing boolean masks into bits and small integer codes into k-bit fields (uint8 storage).

A mask of n booleans takes ceil(n / 8) bytes instead of n (torch.bool) or 4n (a float32
output); codes of k bits (k in 1, 2, 4, 8) take ceil(n k / 8) bytes. :func:`save_codes` and
:func:`saved_codes` keep such codes for an autograd Function's backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from actcomp.core.dispatch import mark_kept

_WIDTHS = (1, 2, 4, 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes in [0, 2^bits) (any shape) packed little-endian into a flat uint8 tensor."""
    if bits not in _WIDTHS:
        raise ValueError(f"bits must be one of {_WIDTHS}, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.contiguous()
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, per_byte) << shifts).sum(1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The first ``numel`` codes of :func:`pack_codes` output, as a flat uint8 tensor."""
    if bits == 8:
        return packed[:numel]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed[:, None] >> shifts) & mask).reshape(-1)[:numel]


def save_codes(ctx: Any, codes: Tensor, bits: int, policy: str) -> None:
    """Keep ``codes`` (a boolean mask for bits = 1) packed for backward: marked as kept under
    ``policy`` (packers leave it alone, measure reports it) and saved on ``ctx`` with its shape."""
    packed = pack_codes(codes, bits)
    mark_kept(policy, packed)
    ctx.save_for_backward(packed)
    ctx.codes_shape, ctx.bits = codes.shape, bits


def saved_codes(ctx: Any) -> Tensor:
    """The uint8 codes :func:`save_codes` kept, in their shape (0/1 for a mask)."""
    (packed,) = ctx.saved_tensors
    return unpack_codes(packed, ctx.bits, math.prod(ctx.codes_shape)).view(ctx.codes_shape)
