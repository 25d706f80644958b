"""The layer registry: module type -> the layer family that runs it with compressed activations.

A **layer family** (:class:`LayerFamily`, one file per family in this package: ``conv.py``,
``linear.py``) is a set of pure functions on tensors: the forward, dX from the weight, db, and
one weight-gradient function per factor type (Tucker, LowRank, PatchMeans). One shared autograd
Function (:mod:`actcomp.kernels.function`) drives them for every family and every method: its
forward asks the layer's method (:mod:`actcomp.methods`) for factors of the input and saves
them; its backward calls the family's functions. Registering a module type is one call,
:func:`register_layer` (with a getter of its weight and bias in the family's layout, e.g. a
transposed weight); the conformance test (tests/test_conformance.py) then needs one settings
row for it. A type from a package actcomp does not import (Hugging Face's ``Conv1D``) is
registered by its qualified name and matched when a model uses it. A subclass of a registered
type that does not override ``forward`` (torch's ``NonDynamicallyQuantizableLinear``) is run
by its base's registration; one that overrides ``forward`` is not supported (its forward may
compute something else than the family's).

:func:`register_kernel` remains for a fully custom kernel ``kernel(module, x, state) -> y``
that brings its own autograd Function.

A family may also carry what features beyond the kernel need of it, so that a feature asks the
registry instead of keeping its own table of families: ``second_order`` (:class:`SecondOrder`:
the KFAC activation root of SINGD and HyLo's per-sample rows, from factors) and ``export``
(:class:`ExportKernels`: forward, dX and dW with graph-exportable ops, for the training-step
export). A family without them is refused by those features with the layer's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from actcomp.core.lookup import inherited_registration
from actcomp.methods.base import InputLayout

Kernel = Callable[[nn.Module, Tensor, Any], Tensor]
Params = Callable[[nn.Module], "tuple[Tensor, Tensor | None]"]
WeightGrad = Callable[[Any, Tensor, torch.Size, Any], Tensor]


def _no_batching(module: nn.Module, x: Tensor) -> tuple[Tensor, bool]:
    return x, False


def _every_geometry(geometry: Any) -> bool:
    return True


def _no_restriction(geometry: Any, weight_shape: torch.Size) -> str | None:
    return None


@dataclass(frozen=True)
class SecondOrder:
    """A family's second-order statistics from its input's factors (SINGD, HyLo).

    With a the layer's processed input rows (n x D; :mod:`actcomp.optim.roots`) and I its
    per-sample rows (:mod:`actcomp.optim.samples`):

    * ``kfac_rows(factors, geometry, weight_shape, approx)`` = a as P Y with P orthonormal,
      never formed (a :class:`~actcomp.kernels.second_order.RowRoot`), for KFAC's A = a^T a;
      ``approx`` is ``"expand"`` or ``"reduce"``;
    * ``factor_samples(factors, geometry, weight_shape)`` = I = L R from the factors (a
      :class:`~actcomp.kernels.second_order.SampleFactors`);
    * ``input_samples(x, geometry, weight_shape)`` = I of a plain input x, in full;
    * ``output_samples(grad_out)`` = (G, B): dY as one row per sample (n x C_out) and the
      batch size B;
    * ``supports(geometry)``: whether a layer of this geometry has them (a 2-D convolution
      does, a 3-D one not); ``layers``: the layer types served, for messages ("Conv2d").
    """

    layers: str
    kfac_rows: Callable[[Any, Any, torch.Size, str], Any]
    factor_samples: Callable[[Any, Any, torch.Size], Any]
    input_samples: Callable[[Tensor, Any, torch.Size], Any]
    output_samples: Callable[[Tensor], "tuple[Tensor, int]"]
    supports: Callable[[Any], bool] = _every_geometry


@dataclass(frozen=True)
class ExportKernels:
    """A family's step kernels for graph export (ONNX has no convolution_backward): the same
    math as the family's own functions, written with exportable ops only.

    ``forward(x, W, b, geometry)``; ``input_grad(dY, W, input_shape, geometry)`` = dX;
    ``weight_grads[type(factors)](factors, dY, weight_shape, geometry)`` = dW from the factor
    types the export can keep for this family (db is the family's ``bias_grad``);
    ``unsupported(geometry, weight_shape)``: what the export supports, in words, when this layer
    is not among it (None when it is); ``layers``: the layer types served, for messages.
    """

    layers: str
    forward: Callable[[Tensor, Tensor, "Tensor | None", Any], Tensor]
    input_grad: Callable[[Tensor, Tensor, torch.Size, Any], Tensor]
    weight_grads: Mapping[type, WeightGrad]
    unsupported: Callable[[Any, torch.Size], "str | None"] = _no_restriction


@dataclass(frozen=True)
class LayerFamily:
    """The pure functions of one layer family (convolutions, linear maps).

    ``geometry(module)``: everything but tensors the math needs (hashable); ``layout(geometry,
    x)``: the :class:`~actcomp.methods.InputLayout` a method factors x by; ``forward(x, W, b,
    geometry)``; ``input_grad(dY, W, input_shape, geometry)`` = dX; ``bias_grad(dY)`` = db;
    ``weight_grads[type(factors)](factors, dY, weight_shape, geometry)`` = dW from factors;
    ``batch(module, x) -> (x, added)`` adds a batch mode to an unbatched input (undone on the
    output when ``added``); ``second_order`` and ``export``: what those features need of the
    family, None when it has none (:class:`SecondOrder`, :class:`ExportKernels`).
    """

    name: str
    geometry: Callable[[nn.Module], Any]
    layout: Callable[[Any, Tensor], InputLayout]
    forward: Callable[[Tensor, Tensor, "Tensor | None", Any], Tensor]
    input_grad: Callable[[Tensor, Tensor, torch.Size, Any], Tensor]
    bias_grad: Callable[[Tensor], Tensor]
    weight_grads: Mapping[type, WeightGrad]
    batch: Callable[[nn.Module, Tensor], "tuple[Tensor, bool]"] = _no_batching
    second_order: SecondOrder | None = None
    export: ExportKernels | None = None


def module_params(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(module.weight, module.bias)``: the layout of torch's own layers."""
    return module.weight, module.bias


@dataclass(frozen=True)
class Registration:
    """How one module type is run: by a family (with its params getter) or a custom kernel.
    ``module_type`` is the type, or its qualified name for a type registered by name."""

    module_type: "type[nn.Module] | str"
    family: LayerFamily | None = None
    params: Params = module_params
    kernel: Kernel | None = field(default=None, compare=False)


_REGISTRY: dict[type[nn.Module], Registration] = {}
_BY_NAME: dict[str, Registration] = {}  # "package.module.Class" -> registration (type not imported)
_RESOLVED: dict[type, "Registration | None"] = {}  # lookups, cleared on every registration


def qualified_name(module_type: type) -> str:
    """``'package.module.Class'``: how a type registered by name is matched."""
    return f"{module_type.__module__}.{module_type.__qualname__}"


def _register(module_type: "type[nn.Module] | str", registration: Registration) -> None:
    if isinstance(module_type, str):
        if "." not in module_type:
            raise ValueError(f"register a type by its qualified name 'package.module.Class', got {module_type!r}")
        _BY_NAME[module_type] = registration
    elif isinstance(module_type, type) and issubclass(module_type, nn.Module):
        _REGISTRY[module_type] = registration
    else:
        raise TypeError(f"register an nn.Module subclass or its qualified name, got {module_type!r}")
    _RESOLVED.clear()


def register_layer(*module_types: "type[nn.Module] | str", family: LayerFamily, params: Params = module_params) -> None:
    """Run these module types with ``family``'s compressed kernel.

    ``params(module) -> (weight, bias)`` gives the weight in the family's layout (Linear:
    (out, in); convolutions: (out, in/groups, *kernel)); it may compute it (a transposed or
    parametrised weight: autograd carries dW on to the parameters it was computed from). A
    type may be given by its qualified name (``"transformers.pytorch_utils.Conv1D"``) so that
    its package need not be imported; subclasses that keep the type's ``forward`` are run too.
    """
    for module_type in module_types:
        _register(module_type, Registration(module_type, family, params))


def register_kernel(*module_types: "type[nn.Module] | str") -> Callable[[Kernel], Kernel]:
    """Decorator: make ``kernel(module, x, state) -> y`` the compressed forward of these module
    types (a custom kernel bringing its own autograd Function; ``state`` is the layer's
    :class:`~actcomp.LayerState`). Prefer :func:`register_layer` with a family."""

    def decorate(kernel: Kernel) -> Kernel:
        for module_type in module_types:
            _register(module_type, Registration(module_type, kernel=kernel))
        return kernel

    return decorate


def _unwrapped(module_type: type[nn.Module]) -> type[nn.Module]:
    """A compressed class's base class; any other class itself."""
    return getattr(module_type, "_actcomp_base", module_type)


def base_type(module: nn.Module) -> type[nn.Module]:
    """The module's own class: for a compressed module, the class it had before compress."""
    return _unwrapped(type(module))


def _own_registration(cls: type) -> Registration | None:
    return _REGISTRY.get(cls) or (_BY_NAME.get(qualified_name(cls)) if _BY_NAME else None)


def registration_for(module_type: type[nn.Module]) -> Registration | None:
    """The registration that runs ``module_type``, or None. A compressed module's class maps
    to its base's. A type inherits the registration of its nearest registered base class
    when it does not override that class's ``forward`` (e.g. ``NonDynamicallyQuantizableLinear``
    runs as ``Linear``); a subclass that overrides ``forward`` is not supported."""
    module_type = _unwrapped(module_type)
    if module_type in _RESOLVED:
        return _RESOLVED[module_type]
    found = inherited_registration(module_type, _own_registration)
    _RESOLVED[module_type] = found
    return found


def overridden_base(module_type: type[nn.Module]) -> type[nn.Module] | None:
    """The registered class ``module_type`` derives from but is not run by, because it
    overrides that class's ``forward`` (timm's ``Linear``, before its registration; a user's
    ``class MyLinear(nn.Linear)`` with its own forward); None when it is run or derives from no
    registered class. Such a type works once registered with :func:`register_layer` (when its
    forward computes what its base's does)."""
    module_type = _unwrapped(module_type)
    if registration_for(module_type) is not None:
        return None
    for cls in module_type.__mro__[1:]:
        if _own_registration(cls) is not None:
            return cls
    return None


def registration_hint(module_type: type[nn.Module], base: type[nn.Module]) -> str:
    """How to register ``module_type`` with the family that runs ``base``, in words."""
    family = registration_for(base)
    family_name = family.family.name if family is not None and family.family is not None else "?"
    return (
        f"actcomp.register_layer({qualified_name(module_type)}, family=actcomp.kernels.family_named({family_name!r})) "
        f"if its forward computes what {base.__name__}'s does"
    )


def is_supported(module_type: type[nn.Module]) -> bool:
    """True when ``module_type`` has a compressed kernel."""
    return registration_for(module_type) is not None


def supported_types() -> tuple[str, ...]:
    """Names of the layer types that have a compressed kernel, sorted (a type registered by
    qualified name shows its package: ``Conv1D (transformers)``)."""
    named = [f"{name.rsplit('.', 1)[1]} ({name.split('.', 1)[0]})" for name in _BY_NAME]
    return tuple(sorted([t.__name__ for t in _REGISTRY] + named))


def registered_types() -> tuple["type[nn.Module] | str", ...]:
    """Every registration key: the types, and the qualified names of types registered by name."""
    return (*_REGISTRY, *_BY_NAME)


def registered_families() -> tuple[LayerFamily, ...]:
    """Every family some registration runs, once each, in registration order."""
    families: list[LayerFamily] = []
    for registration in (*_REGISTRY.values(), *_BY_NAME.values()):
        family = registration.family
        if family is not None and not any(family is known for known in families):  # by identity: not hashable
            families.append(family)
    return tuple(families)


def family_named(name: str) -> LayerFamily:
    """The registered family called ``name`` ("linear", "conv"); ValueError naming the known ones."""
    for family in registered_families():
        if family.name == name:
            return family
    known = ", ".join(sorted({f.name for f in registered_families()}))
    raise ValueError(f"no registered layer family is called {name!r}; known: {known}")


def second_order_layers() -> str:
    """The layer types that have second-order statistics, for messages: ``'Conv2d, Linear'``."""
    return ", ".join(sorted({f.second_order.layers for f in registered_families() if f.second_order is not None}))


def second_order_family(module: nn.Module, name: str, as_type: type[nn.Module] | None = None) -> LayerFamily:
    """The family whose second-order statistics serve ``module`` (called ``name`` in its model),
    looked up in the registry by the module's own class (or by ``as_type``: the torch class an
    optimizer treats it as); TypeError naming the layer, its type and the supported types when
    it has none (no registration, a family without them, or a geometry they do not cover, e.g. a
    Conv3d)."""
    registration = registration_for(as_type or base_type(module))
    family = registration.family if registration is not None else None
    if family is None or family.second_order is None or not family.second_order.supports(family.geometry(module)):
        raise TypeError(
            f"layer '{name}' ({base_type(module).__name__}) has no second-order statistics; "
            f"supported: {second_order_layers()}"
        )
    return family
