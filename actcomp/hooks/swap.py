"""compress / restore / stats: attach compressed kernels to a model without changing it.

A selected module keeps its object, parameters, buffers and state_dict keys; only its class is
swapped for a subclass of its own class (so ``isinstance`` checks still hold) whose forward runs
the registered kernel in training mode with gradients enabled, and the plain forward otherwise
(eval mode, ``torch.no_grad()``, ``method='none'``). ``restore`` swaps the class back.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from actcomp.config import CompressionConfig, LayerStats
from actcomp.hooks.select import LayerSelector, select_layers
from actcomp.kernels import base_type, kernel_for
from actcomp.kernels.common import LayerState, record_plain_input

_STATE = "_actcomp_layer"
_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _compressed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    layer: LayerState = getattr(self, _STATE)
    base = type(self)._actcomp_base
    if not (self.training and torch.is_grad_enabled()) or len(args) != 1 or kwargs:
        return base.forward(self, *args, **kwargs)
    if layer.config.method == "none":
        (x,) = args
        record_plain_input(layer, x, getattr(self, "weight", None))
        return base.forward(self, x)
    return kernel_for(base)(self, args[0], layer)


def _extra_repr(self: nn.Module) -> str:
    base = type(self)._actcomp_base
    config = getattr(self, _STATE).config
    setting = f"r={config.patch}" if config.method == "gradient_filter" else f"eps={config.eps:g}"
    return f"{base.extra_repr(self)}, actcomp={config.method}({setting})"


def compressed_class(base: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``base`` a compressed module takes (one per base, importable by name so
    that a compressed model pickles)."""
    cls = _SUBCLASSES.get(base)
    if cls is None:
        name = f"Compressed{base.__name__}"
        module = sys.modules[__name__]
        while hasattr(module, name):
            name += "_"
        namespace = {
            "forward": _compressed_forward,
            "extra_repr": _extra_repr,
            "_actcomp_base": base,
            "__module__": __name__,
            "__qualname__": name,
        }
        cls = type(name, (base,), namespace)
        setattr(module, name, cls)
        _SUBCLASSES[base] = cls
    return cls


def compress(
    model: nn.Module,
    layers: LayerSelector = "all",
    method: str | None = None,
    eps: float | None = None,
    *,
    config: CompressionConfig | None = None,
    sample: object = None,
) -> nn.Module:
    """Make the selected layers keep low-rank factors of their inputs for backward; in place.

    Each selected layer, in training mode with gradients enabled, stores a factorisation of its
    input X (Tucker for ``method='hosvd'``: X ~ S x_1 U_1 ... with each mode's rank the smallest
    explaining a fraction ``eps`` of ||X||_F^2; rank-k for ``method='svd'``) and computes dW, db
    from the factors and dX = dY W exactly from the weight. ``layers`` is ``"all"``,
    ``"last:N"`` (execution order when ``sample`` is given, else module order), ``"re:<pattern>"``,
    a list of qualified names or a callable ``(name, module) -> bool``. Defaults: hosvd,
    eps=0.8. Calling it again updates the settings of layers already compressed. Returns
    ``model``, whose parameters, state_dict keys and isinstance checks are unchanged.
    """
    if config is None:
        config = CompressionConfig(method if method is not None else "hosvd", eps if eps is not None else 0.8)
    elif method is not None or eps is not None:
        raise ValueError("give either config= or method=/eps=, not both")
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress needs a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    for name in select_layers(model, layers, sample):
        module = modules[name]
        base = base_type(module)
        module.__class__ = compressed_class(base)
        setattr(module, _STATE, LayerState(name=name, layer_type=base.__name__, config=config))
    return model


def restore(model: nn.Module) -> nn.Module:
    """Return every compressed layer of ``model`` to its own class and plain autograd; in place.

    Afterwards the model computes bit-identical outputs and gradients to a model that was never
    compressed (its parameters were never touched). Returns ``model``.
    """
    for module in model.modules():
        if hasattr(module, _STATE):
            module.__class__ = type(module)._actcomp_base
            delattr(module, _STATE)
    return model


def compressed_layers(model: nn.Module) -> dict[str, CompressionConfig]:
    """The compressed layers of ``model`` by qualified name, with their settings."""
    return {name: getattr(m, _STATE).config for name, m in model.named_modules() if hasattr(m, _STATE)}


def stats(model: nn.Module) -> dict[str, LayerStats]:
    """Per compressed layer, what its last training forward kept: ranks per mode, bytes kept,
    and the bytes its plain input would have taken. Layers not run in training yet are absent."""
    out = {}
    for name, module in model.named_modules():
        layer = getattr(module, _STATE, None)
        if layer is not None and layer.last is not None:
            out[name] = layer.last
    return out
