"""Packing boolean masks into bits and small integer codes into k-bit fields (uint8 storage).

A mask of n booleans takes ceil(n / 8) bytes instead of n (torch.bool) or 4n (a float32
output); codes of k bits (k in 1, 2, 4, 8) take ceil(n k / 8) bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def pack_mask(mask: Tensor) -> Tensor:
    """A boolean mask (any shape) as bits: a flat uint8 tensor of ceil(numel / 8) bytes."""
    return pack_codes(mask, 1)


def unpack_mask(packed: Tensor, shape: torch.Size) -> Tensor:
    """The boolean mask of ``shape`` that :func:`pack_mask` packed."""
    numel = 1
    for n in shape:
        numel *= n
    return unpack_codes(packed, 1, numel).view(shape).bool()
