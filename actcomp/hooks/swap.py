"""compress / restore / stats: attach compressed kernels to a model without changing it.

A selected module keeps its object, parameters, buffers and state_dict keys; only its class is
swapped for a subclass of its own class (so ``isinstance`` checks still hold) whose forward runs
the registered kernel in training mode with gradients enabled, and the plain forward otherwise
(eval mode, ``torch.no_grad()``, inside :func:`suspended`). ``restore`` swaps the class back.
The per-layer state (:class:`~actcomp.LayerState`) is public through :func:`layer_state`.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from actcomp.config import CompressionConfig, LayerStats
from actcomp.hooks.select import LayerSelector, select_layers
from actcomp.kernels import base_type, kernel_for
from actcomp.state import LayerState

_STATE = "_actcomp_layer"
_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {}
_INPUT_PARAMETER: dict[type[nn.Module], tuple[inspect.Signature, str]] = {}


def layer_state(module: nn.Module) -> LayerState | None:
    """The :class:`~actcomp.LayerState` of a compressed module (settings, last stats, the
    method's carried state such as asi's subspaces), or None when it is not compressed."""
    return module.__dict__.get(_STATE)


@contextlib.contextmanager
def suspended(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it, the compressed layers of ``model`` run plain autograd.

    Nothing is changed but a flag: settings, stats and carried method state (asi's tracked
    subspaces) are as they were when the block ends. ``with actcomp.suspended(model): ...``
    """
    states = [s for s in (layer_state(m) for m in model.modules()) if s is not None]
    previous = [s.active for s in states]
    for s in states:
        s.active = False
    try:
        yield model
    finally:
        for s, active in zip(states, previous):
            s.active = active


def _input_of(self: nn.Module, base: type[nn.Module], state: LayerState, args: tuple, kwargs: dict) -> Tensor:
    """The input tensor of a call ``module(*args, **kwargs)``, bound as ``base.forward`` binds
    it; any other argument is refused by name (the compressed kernels take one tensor)."""
    if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
        return args[0]
    cached = _INPUT_PARAMETER.get(base)
    if cached is None:
        signature = inspect.signature(base.forward)
        names = list(signature.parameters)
        cached = _INPUT_PARAMETER[base] = (signature, names[1] if len(names) > 1 else "")
    signature, first = cached
    try:
        bound = signature.bind(self, *args, **kwargs)
    except TypeError as error:
        raise TypeError(f"{state.describe()}: {error}") from None
    extra = [name for name in bound.arguments if name not in (first, next(iter(signature.parameters)))]
    x = bound.arguments.get(first)
    if extra or not isinstance(x, Tensor):
        given = ", ".join([*(type(a).__name__ for a in args), *(f"{k}=" for k in kwargs)])
        raise TypeError(
            f"{state.describe()} was called as ({given}); its compressed kernel takes one input tensor "
            f"'{first}' and nothing else: call it with that tensor alone, or restore() this layer"
        )
    return x


def _compressed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: LayerState = self.__dict__[_STATE]
    base = type(self)._actcomp_base
    if not (state.active and self.training and torch.is_grad_enabled()):
        return base.forward(self, *args, **kwargs)
    x = _input_of(self, base, state, args, kwargs)
    if state.config.method == "none":
        weight = getattr(self, "weight", None)
        state.record(x, (), x.numel() * x.element_size() if weight is not None and weight.requires_grad else 0)
        return base.forward(self, x)
    return kernel_for(base)(self, x, state)


def _extra_repr(self: nn.Module) -> str:
    state: LayerState = self.__dict__[_STATE]
    return f"{type(self)._actcomp_base.extra_repr(self)}, actcomp={state.config.method}({state.compressor.setting()})"


def _new_compressed(base: type[nn.Module]) -> nn.Module:
    """Unpickling: an empty instance of ``base``'s compressed class (its __dict__ follows)."""
    module = base.__new__(base)
    module.__class__ = compressed_class(base)
    return module


def _reduce_ex(self: nn.Module, protocol: int) -> tuple:
    """Pickle a compressed module by its base class (importable in any process), not by the
    compressed class, which exists only once :func:`compressed_class` has made it."""
    return (_new_compressed, (type(self)._actcomp_base,), self.__dict__.copy())


def compressed_class(base: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``base`` a compressed module takes (one per base)."""
    cls = _SUBCLASSES.get(base)
    if cls is None:
        namespace = {
            "forward": _compressed_forward,
            "extra_repr": _extra_repr,
            "__reduce_ex__": _reduce_ex,
            "_actcomp_base": base,
            "__module__": __name__,
        }
        cls = type(f"Compressed{base.__name__}", (base,), namespace)
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
    eps=0.8. Calling it again updates the settings of layers already compressed (asi keeps its
    tracked subspaces when the method stays asi). Returns ``model``, whose parameters,
    state_dict keys and isinstance checks are unchanged.
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
        state = layer_state(module)
        if state is not None:
            state.configure(config)
            continue
        base = base_type(module)
        module.__class__ = compressed_class(base)
        module.__dict__[_STATE] = LayerState(name=name, layer_type=base.__name__, config=config)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Return every compressed layer of ``model`` to its own class and plain autograd; in place.

    Afterwards the model computes bit-identical outputs and gradients to a model that was never
    compressed (its parameters were never touched). Returns ``model``.
    """
    for module in model.modules():
        if layer_state(module) is not None:
            module.__class__ = type(module)._actcomp_base
            del module.__dict__[_STATE]
    return model


def compressed_layers(model: nn.Module) -> dict[str, CompressionConfig]:
    """The compressed layers of ``model`` by qualified name, with their settings."""
    return {name: s.config for name, m in model.named_modules() if (s := layer_state(m)) is not None}


def stats(model: nn.Module) -> dict[str, LayerStats]:
    """Per compressed layer, what its last training forward kept: ranks per mode, bytes kept,
    and the bytes its plain input would have taken. Layers not run in training yet are absent."""
    out = {}
    for name, module in model.named_modules():
        state = layer_state(module)
        if state is not None and state.last is not None:
            out[name] = state.last
    return out
