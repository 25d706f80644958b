"""Layer kernels: one file per layer family, one shared autograd Function that runs them.

The registry (module type -> :class:`LayerFamily`) lives in :mod:`actcomp.kernels.base`; the
Function in :mod:`actcomp.kernels.function`. Importing this package registers the built-in
families: Conv1d/2d/3d, Linear, and transformers' Conv1D (by qualified name).
"""

from actcomp.kernels.base import (
    Kernel,
    LayerFamily,
    Registration,
    base_type,
    is_supported,
    qualified_name,
    register_kernel,
    register_layer,
    registered_types,
    registration_for,
    supported_types,
)
from actcomp.kernels.function import kernel_for
from actcomp.kernels import conv, linear, hf_conv1d  # noqa: F401,E402  (register the built-in families)

__all__ = [
    "Kernel",
    "LayerFamily",
    "Registration",
    "base_type",
    "is_supported",
    "kernel_for",
    "qualified_name",
    "register_kernel",
    "register_layer",
    "registered_types",
    "registration_for",
    "supported_types",
]
