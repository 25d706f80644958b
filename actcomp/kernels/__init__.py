"""Registry of compressed kernels: layer type -> function running the layer with compression.

A kernel is a function ``kernel(module, input, layer) -> output`` where ``layer`` is the
:class:`~actcomp.kernels.common.LayerState` of that module (its name, config and last stats).
It must return what the plain module returns, through an autograd Function whose forward keeps
factors of the input and whose backward computes the weight gradient from those factors.
Register one with :func:`register_kernel`; a new layer type is one file in this package.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from actcomp.kernels.common import LayerState

Kernel = Callable[[nn.Module, Tensor, LayerState], Tensor]

_REGISTRY: dict[type[nn.Module], Kernel] = {}


def register_kernel(*module_types: type[nn.Module]) -> Callable[[Kernel], Kernel]:
    """Decorator: make ``kernel`` the compressed forward of exactly these module types."""

    def decorate(kernel: Kernel) -> Kernel:
        for module_type in module_types:
            _REGISTRY[module_type] = kernel
        return kernel

    return decorate


def _unwrapped(module_type: type[nn.Module]) -> type[nn.Module]:
    """A compressed class's base class; any other class itself."""
    return getattr(module_type, "_actcomp_base", module_type)


def base_type(module: nn.Module) -> type[nn.Module]:
    """The module's own class: for a compressed module, the class it had before compress."""
    return _unwrapped(type(module))


def kernel_for(module_type: type[nn.Module]) -> Kernel | None:
    """The kernel registered for exactly ``module_type`` (subclasses do not inherit it: they
    may override ``forward``), or None. A compressed module's class maps to its base's kernel."""
    return _REGISTRY.get(_unwrapped(module_type))


def supported_types() -> tuple[str, ...]:
    """Names of the layer types that have a compressed kernel, sorted."""
    return tuple(sorted(t.__name__ for t in _REGISTRY))


from actcomp.kernels import conv as _conv  # noqa: E402,F401  (registers Conv1d, Conv2d)
from actcomp.kernels import linear as _linear  # noqa: E402,F401  (registers Linear)
