"""Layer kernels: one file per layer family, one shared autograd Function that runs them.

The registry (module type -> :class:`LayerFamily`) lives in :mod:`actcomp.kernels.base`; the
Function in :mod:`actcomp.kernels.function`. Importing this package registers the built-in
families: Conv1d/2d/3d, Linear, and transformers' Conv1D and timm's Linear (by qualified name),
and the attention kernels of nn.MultiheadAttention and torchvision's ShiftedWindowAttention (V1, V2).
"""

from actcomp.kernels.base import (
    Kernel,
    LayerFamily,
    Registration,
    base_type,
    family_named,
    is_supported,
    overridden_base,
    qualified_name,
    registration_hint,
    register_kernel,
    register_layer,
    registered_types,
    registration_for,
    supported_types,
)
from actcomp.kernels.function import kernel_for
from actcomp.kernels import conv, linear, hf_conv1d, timm_linear, mha, swin  # noqa: F401,E402  (register the built-in families)

__all__ = [
    "Kernel",
    "LayerFamily",
    "Registration",
    "base_type",
    "family_named",
    "is_supported",
    "overridden_base",
    "registration_hint",
    "kernel_for",
    "qualified_name",
    "register_kernel",
    "register_layer",
    "registered_types",
    "registration_for",
    "supported_types",
]
