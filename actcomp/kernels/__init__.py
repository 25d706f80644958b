"""The layer registry: module type -> the layer family that runs it with compressed activations.

A **layer family** (:class:`LayerFamily`, one file per family in this package: ``conv.py``,
``linear.py``) is a set of pure functions on tensors: the forward, dX from the weight, db, and
one weight-gradient function per factor type (Tucker, LowRank, PatchMeans). One shared autograd
Function (:mod:`actcomp.kernels.function`) drives them for every family and every method: its
forward asks the layer's method (:mod:`actcomp.methods`) for factors of the input and saves
them; its backward calls the family's functions. Registering a module type is one call,
:func:`register_layer` (with a getter of its weight and bias in the family's layout, e.g. a
transposed weight); the conformance test (tests/test_conformance.py) then needs one settings
row for it.

:func:`register_kernel` remains for a fully custom kernel ``kernel(module, x, state) -> y``
that brings its own autograd Function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from actcomp.methods import InputLayout

Kernel = Callable[[nn.Module, Tensor, Any], Tensor]
Params = Callable[[nn.Module], "tuple[Tensor, Tensor | None]"]
WeightGrad = Callable[[Any, Tensor, torch.Size, Any], Tensor]


def _no_batching(module: nn.Module, x: Tensor) -> tuple[Tensor, bool]:
    return x, False


@dataclass(frozen=True)
class LayerFamily:
    """The pure functions of one layer family (convolutions, linear maps).

    ``geometry(module)``: everything but tensors the math needs (hashable); ``layout(geometry,
    x)``: the :class:`~actcomp.methods.InputLayout` a method factors x by; ``forward(x, W, b,
    geometry)``; ``input_grad(dY, W, input_shape, geometry)`` = dX; ``bias_grad(dY)`` = db;
    ``weight_grads[type(factors)](factors, dY, weight_shape, geometry)`` = dW from factors;
    ``batch(module, x) -> (x, added)`` adds a batch mode to an unbatched input (undone on the
    output when ``added``).
    """

    name: str
    geometry: Callable[[nn.Module], Any]
    layout: Callable[[Any, Tensor], InputLayout]
    forward: Callable[[Tensor, Tensor, "Tensor | None", Any], Tensor]
    input_grad: Callable[[Tensor, Tensor, torch.Size, Any], Tensor]
    bias_grad: Callable[[Tensor], Tensor]
    weight_grads: Mapping[type, WeightGrad]
    batch: Callable[[nn.Module, Tensor], "tuple[Tensor, bool]"] = _no_batching


def module_params(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(module.weight, module.bias)``: the layout of torch's own layers."""
    return module.weight, module.bias


@dataclass(frozen=True)
class Registration:
    """How one module type is run: by a family (with its params getter) or a custom kernel."""

    module_type: type[nn.Module]
    family: LayerFamily | None = None
    params: Params = module_params
    kernel: Kernel | None = field(default=None, compare=False)


_REGISTRY: dict[type[nn.Module], Registration] = {}


def register_layer(*module_types: type[nn.Module], family: LayerFamily, params: Params = module_params) -> None:
    """Run exactly these module types with ``family``'s compressed kernel.

    ``params(module) -> (weight, bias)`` gives the weight in the family's layout (Linear:
    (out, in); convolutions: (out, in/groups, *kernel)); it may compute it (a transposed or
    parametrised weight: autograd carries dW on to the parameters it was computed from).
    """
    for module_type in module_types:
        _REGISTRY[module_type] = Registration(module_type, family, params)


def register_kernel(*module_types: type[nn.Module]) -> Callable[[Kernel], Kernel]:
    """Decorator: make ``kernel(module, x, state) -> y`` the compressed forward of exactly these
    module types (a custom kernel bringing its own autograd Function; ``state`` is the layer's
    :class:`~actcomp.LayerState`). Prefer :func:`register_layer` with a family."""

    def decorate(kernel: Kernel) -> Kernel:
        for module_type in module_types:
            _REGISTRY[module_type] = Registration(module_type, kernel=kernel)
        return kernel

    return decorate


def _unwrapped(module_type: type[nn.Module]) -> type[nn.Module]:
    """A compressed class's base class; any other class itself."""
    return getattr(module_type, "_actcomp_base", module_type)


def base_type(module: nn.Module) -> type[nn.Module]:
    """The module's own class: for a compressed module, the class it had before compress."""
    return _unwrapped(type(module))


def registration_for(module_type: type[nn.Module]) -> Registration | None:
    """The registration of exactly ``module_type`` (subclasses do not inherit it: they may
    override ``forward``), or None. A compressed module's class maps to its base's."""
    return _REGISTRY.get(_unwrapped(module_type))


def kernel_for(module_type: type[nn.Module]) -> Kernel | None:
    """The compressed forward ``kernel(module, x, state) -> y`` of ``module_type``, or None."""
    registration = registration_for(module_type)
    if registration is None:
        return None
    if registration.kernel is not None:
        return registration.kernel
    from actcomp.kernels.function import run_layer

    return lambda module, x, state: run_layer(registration, module, x, state)


def is_supported(module_type: type[nn.Module]) -> bool:
    """True when ``module_type`` has a compressed kernel."""
    return registration_for(module_type) is not None


def supported_types() -> tuple[str, ...]:
    """Names of the layer types that have a compressed kernel, sorted."""
    return tuple(sorted(t.__name__ for t in _REGISTRY))


from actcomp.kernels import conv as _conv  # noqa: E402,F401  (registers Conv1d, Conv2d, Conv3d)
from actcomp.kernels import linear as _linear  # noqa: E402,F401  (registers Linear)
