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
import sys
import types
import warnings
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from actcomp.core.config import CompressionConfig, LayerStats
from actcomp.attach.select import LayerSelector, Trace, select_layers, trace
from actcomp.kernels import base_type, kernel_for, registration_for
from actcomp.methods import InputLayout
from actcomp.policies import Neighbours, NeighbourState, factor_config, neighbour_handler, neighbour_registration
from actcomp.policies.generic import attach_generic, detach_generic, generic_packer
from actcomp.core.state import LayerState, enter_forward, leave_forward, plain_kept_bytes, trains_weight

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
    packers = [p for p in (generic_packer(m) for m in model.modules()) if p is not None]
    previous = [s.active for s in states] + [p.active for p in packers]
    for s in [*states, *packers]:
        s.active = False
    try:
        yield model
    finally:
        for s, active in zip([*states, *packers], previous):
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


def _neighbour_forward(self: nn.Module, base: type[nn.Module], state: NeighbourState, args: tuple, kwargs: dict) -> Any:
    """A neighbour module runs its policy's Function in a step that records gradients; any
    other call (no grad, an unusual signature, nothing to keep) runs its plain forward."""
    if state.active and torch.is_grad_enabled() and len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
        y = neighbour_handler(base)(self, args[0], state)
        if y is not None:
            return y
    return base.forward(self, *args, **kwargs)


def _compressed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: LayerState = self.__dict__[_STATE]
    base = type(self)._actcomp_base
    state.calls += 1
    if isinstance(state, NeighbourState):
        return _neighbour_forward(self, base, state, args, kwargs)
    if not (state.active and self.training and torch.is_grad_enabled()):
        return base.forward(self, *args, **kwargs)
    kernel = registration_for(base).kernel
    if getattr(kernel, "takes_call", False):  # a kernel taking the whole call (attention: query, key, value, masks)
        return kernel(self, state, *args, **kwargs)
    x = _input_of(self, base, state, args, kwargs)
    if registration_for(base).family is None and _runs_plain_whatever_layout(state):
        # a custom kernel (no family: its layout is its own) under a method that runs every
        # layer plainly; a family's kernel asks the method with the real layout (run_layer)
        state.record(x, (), plain_kept_bytes(self, x))
        return base.forward(self, x)
    return kernel_for(base)(self, x, state)


#: One layout with spatial modes and one without: a method that runs both plainly (method
#: ``none``) runs any layer plainly.
_LAYOUTS = (InputLayout(sample_modes=1), InputLayout(sample_modes=1, stride=(1,)))


def _runs_plain_whatever_layout(state: LayerState) -> bool:
    return all(state.compressor.runs_plain(layout) for layout in _LAYOUTS)


def _extra_repr(self: nn.Module) -> str:
    state: LayerState = self.__dict__[_STATE]
    own = type(self)._actcomp_base.extra_repr(self)
    if isinstance(state, NeighbourState):
        setting = f"actcomp=neighbour({state.compressor.setting()})" if state.approximate else "actcomp=neighbour(exact)"
    else:
        setting = f"actcomp={state.config.method}({state.compressor.setting()})"
    return f"{own}, {setting}" if own else setting


def _new_compressed(base: type[nn.Module]) -> nn.Module:
    """Unpickling: an empty instance of ``base``'s compressed class (its __dict__ follows)."""
    module = base.__new__(base)
    module.__class__ = compressed_class(base)
    return module


def _reduce_ex(self: nn.Module, protocol: int) -> tuple:
    """Pickle a compressed module by its base class (importable in any process), not by the
    compressed class, which exists only once :func:`compressed_class` has made it."""
    return (_new_compressed, (type(self)._actcomp_base,), self.__dict__.copy())


def _own_code(function: Any, base: type[nn.Module]) -> Any:
    """``function`` with a code object of its own for ``base``'s compressed class.
    torch.compile (dynamo) keeps its compiled frames per code object and guards each on the
    module's class: one shared forward for every compressed class would hit dynamo's
    recompile limit after 8 classes (a model with Linear, Conv2d, BatchNorm, ReLU, pooling...
    compressed) and fall back to eager with a warning; a code object per class keeps the
    entries apart."""
    code = function.__code__.replace(co_name=f"{function.__name__}_{base.__name__}")
    own = types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)
    own.__qualname__, own.__doc__ = f"Compressed{base.__name__}.forward", function.__doc__
    return own


def compressed_class(base: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``base`` a compressed module takes (one per base)."""
    cls = _SUBCLASSES.get(base)
    if cls is None:
        namespace = {
            "forward": _own_code(_compressed_forward, base),
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
    neighbours: Neighbours | str | None = "auto",
) -> nn.Module:
    """Make the selected layers keep low-rank factors of their inputs for backward, and their
    neighbours keep as little as their backward needs; in place.

    Each selected layer, in training mode with gradients enabled, stores a factorisation of its
    input X (Tucker for ``method='hosvd'``: X ~ S x_1 U_1 ... with each mode's rank the smallest
    explaining a fraction ``eps`` of ||X||_F^2; rank-k for ``method='svd'``) and computes dW, db
    from the factors and dX = dY W exactly from the weight. ``layers`` is ``"all"``,
    ``"last:N"`` (execution order when ``sample`` is given, else module order; ``sample`` is
    the model's inputs as :func:`~actcomp.core.batch.call_model` feeds them: a tensor, a tuple
    of positional arguments or a dict of keyword arguments), ``"re:<pattern>"``,
    a list of qualified names or a callable ``(name, module) -> bool``. Defaults: hosvd,
    eps=0.99 (the setting that lost under a point of accuracy over 3 seeds on the demo task;
    BENCHMARKS.md ``quality-neighbours``). ``neighbours`` (default ``"auto"``, i.e. :class:`Neighbours()`): ReLU-family
    activations and dropout keep bit masks, max pooling small indices, average pooling and
    frozen eval-mode BatchNorm nothing (all exact); after the first compressed layer a
    training BatchNorm keeps factors of its normalised input (see :mod:`actcomp.policies`);
    ``None`` leaves the neighbours alone. The automatic selections leave frozen layers out (a
    frozen layer keeps nothing of its input: the base layers of a PEFT LoRA model), and a
    layer compressed earlier that is frozen now and not selected is returned to plain (layers
    frozen or wrapped after compress are named by a ``FrozenLayerWarning`` at the next training
    forward). Calling it again updates the settings (asi keeps its tracked subspaces while the
    method stays asi). Returns ``model``, whose parameters,
    state_dict keys and isinstance checks are unchanged.
    """
    if config is None:
        config = CompressionConfig(method if method is not None else "hosvd", eps if eps is not None else 0.99)
    elif method is not None or eps is not None:
        raise ValueError("give either config= or method=/eps=, not both")
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress needs a torch.nn.Module, got {type(model).__name__}")
    policy = _neighbour_settings(neighbours)
    modules = dict(model.named_modules())
    traced = trace(model, sample) if sample is not None else None
    chosen = select_layers(model, layers, traced=traced)
    left = set(modules) - set(chosen)
    for name, module in modules.items():
        if name in left and _is_layer(layer_state(module)) and not trains_weight(module):
            _unswap(module)  # compressed earlier, frozen since (e.g. a LoRA base layer): it keeps nothing
    for name in chosen:
        module = modules[name]
        state = layer_state(module)
        if isinstance(state, LayerState) and not isinstance(state, NeighbourState):
            state.configure(config)
            continue
        base = base_type(module)
        module.__class__ = compressed_class(base)
        module.__dict__[_STATE] = LayerState(name=name, layer_type=base.__name__, config=config)
    _attach_neighbours(model, policy, config, traced)
    watch = _attach_watch(model)
    # a layer named while frozen was asked for as it is: FrozenLayerWarning is for layers frozen since
    watch.frozen_warned.update(id(layer_state(modules[n])) for n in chosen if not trains_weight(modules[n]))
    return model


def _neighbour_settings(neighbours: Neighbours | str | None) -> Neighbours | None:
    if neighbours is None or neighbours == "off":
        return None
    if neighbours == "auto":
        return Neighbours()
    if isinstance(neighbours, Neighbours):
        return neighbours
    raise ValueError(f"neighbours must be 'auto', 'off', None or an actcomp.Neighbours, got {neighbours!r}")


def _attach_neighbours(model: nn.Module, policy: Neighbours | None, config: CompressionConfig, traced: Trace | None) -> None:
    """Swap every module with a neighbour policy (or put them back with ``policy=None``);
    approximate policies only for modules after the first compressed layer."""
    detach_generic(model)
    if policy is None:
        for module in model.modules():
            if isinstance(layer_state(module), NeighbourState):
                _unswap(module)
        return
    order = traced.order if traced is not None else [n for n, _ in model.named_modules()]
    position = {n: i for i, n in enumerate(order)}
    compressed = [position[n] for n in compressed_layers(model) if n in position]
    first = min(compressed) if compressed else len(order)
    for name, module in model.named_modules():
        registration = neighbour_registration(base_type(module))
        state = layer_state(module)
        if registration is None or (state is not None and not isinstance(state, NeighbourState)):
            continue
        if not registration.applies(policy):
            if state is not None:
                _unswap(module)
            continue
        attach_neighbour(module, name, factor_config(config, policy), policy, position.get(name, -1) > first)
    if policy.generic:
        attach_generic(model, factor_config(config, policy).eps, policy.threshold)


def attach_neighbour(module: nn.Module, name: str, config: CompressionConfig, policy: Neighbours, approximate: bool) -> NeighbourState:
    """Give one neighbour module (a type with a policy) its state, or update it: ``config``
    is the method and eps of its factors, ``approximate`` whether approximate policies apply."""
    state = layer_state(module)
    if isinstance(state, NeighbourState):
        state.configure(config)
        state.neighbours, state.approximate = policy, approximate
        return state
    base = base_type(module)
    if neighbour_handler(base) is None:
        raise ValueError(f"layer '{name}' ({base.__name__}) has no neighbour policy")
    module.__class__ = compressed_class(base)
    state = NeighbourState(name=name, layer_type=base.__name__, config=config, neighbours=policy, approximate=approximate)
    module.__dict__[_STATE] = state
    return state


def neighbour_states(model: nn.Module) -> dict[str, NeighbourState]:
    """The neighbour modules of ``model`` (those with a policy) by qualified name."""
    return {name: s for name, m in model.named_modules() if isinstance(s := layer_state(m), NeighbourState)}


def _unswap(module: nn.Module) -> None:
    cls = type(module)
    base = cls._actcomp_base
    module.__class__ = base if cls is compressed_class(base) else _unstacked(cls, base)
    del module.__dict__[_STATE]


_UNSTACKED: dict[type, type] = {}


def _unstacked(cls: type, base: type[nn.Module]) -> type:
    """``cls``, a class another library stacked on a compressed class after compress (FSDP2's
    ``fully_shard`` makes ``FSDP<Class>(FSDPModule, <Class>)`` of the module's class), rebuilt
    on ``base`` instead of the compressed class: restore keeps what was stacked on top."""
    found = _UNSTACKED.get(cls)
    if found is None:
        compressed = compressed_class(base)
        bases = tuple(base if b is compressed else b for b in cls.__bases__)
        if bases == cls.__bases__:  # stacked deeper than one level: rebuild the level below first
            bases = tuple(_unstacked(b, base) if issubclass(b, compressed) else b for b in cls.__bases__)
        namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        found = _UNSTACKED[cls] = type(cls.__name__, bases, namespace)
    return found


def restore(model: nn.Module) -> nn.Module:
    """Return every compressed layer of ``model`` to its own class and plain autograd; in place.

    Afterwards the model computes bit-identical outputs and gradients to a model that was never
    compressed (its parameters were never touched). Returns ``model``.
    """
    for module in model.modules():
        if layer_state(module) is not None:
            _unswap(module)
        _detach_watch(module)
    detach_generic(model)
    return model


def compressed_layers(model: nn.Module) -> dict[str, CompressionConfig]:
    """The compressed layers of ``model`` by qualified name, with their settings (neighbour
    modules, which keep masks, indices or nothing, are not layers and are not listed)."""
    return {name: s.config for name, m in model.named_modules() if _is_layer(s := layer_state(m))}


def _is_layer(state: LayerState | None) -> bool:
    return state is not None and not isinstance(state, NeighbourState)


def stats(model: nn.Module) -> dict[str, LayerStats]:
    """Per compressed layer, what its last training forward kept: ranks per mode, bytes kept,
    and the bytes its plain input would have taken. Layers not run in training yet are absent."""
    out = {}
    for name, module in model.named_modules():
        state = layer_state(module)
        if _is_layer(state) and (entry := state.stats()) is not None:
            out[name] = entry
    return out


class _Watch:
    """Forward pre-hook and hook on the model given to :func:`compress`: after each of its
    training forwards (training mode, gradients enabled), every active compressed layer inside
    it whose kernel did not run is recorded as not run (:meth:`LayerState.not_run`, which warns
    the first time)."""

    def __init__(self) -> None:
        self.stack: list[list[tuple[nn.Module, LayerState, int, int]] | None] = []
        self.frozen_warned: set[int] = set()  # ids of states already named in a FrozenLayerWarning

    def enter(self, model: nn.Module, args: object) -> None:
        enter_forward()
        watched = None
        if model.training and torch.is_grad_enabled():
            watched = [(m, s, s.runs, s.calls) for m in model.modules() if _is_layer(s := layer_state(m)) and s.active]
        self.stack.append(watched)

    def leave(self, model: nn.Module, args: object, output: object) -> None:
        leave_forward()
        watched = self.stack.pop() if self.stack else None
        if sys.exc_info()[1] is not None:
            return  # the forward raised (this hook runs while the error propagates): no step ran
        frozen = []
        for module, state, runs, calls in watched or ():
            if state.runs != runs and not trains_weight(module) and id(state) not in self.frozen_warned:
                frozen.append((module, state))
            if state.runs != runs or not state.active:
                continue
            if state.calls == calls:
                reason = (
                    "its forward was not called (does a parent read its .weight itself, e.g. F.linear(x, layer.weight)? "
                    "compress(..., sample=x) finds such layers and leaves them out of layers='all')"
                )
            elif not module.training:
                reason = "it is in eval mode, where its plain forward runs"
            else:
                reason = "its forward ran with gradients disabled"
            state.not_run(reason)
        if frozen:
            self.frozen_warned.update(id(state) for _, state in frozen)
            _warn_frozen(model, frozen)


class FrozenLayerWarning(UserWarning):
    """Layers compressed while trained that are frozen now (their weight no longer requires
    grad; e.g. wrapped by peft's get_peft_model after compress): they keep nothing of their
    input either way, so compressing them saves nothing, and the layers that do train now
    (LoRA's A and B) may not be compressed."""


def _warn_frozen(model: nn.Module, frozen: list[tuple[nn.Module, LayerState]]) -> None:
    names = {id(m): n for n, m in model.named_modules()}
    described = []
    for module, state in frozen:
        now = names.get(id(module), state.name)
        moved = f", now '{now}'" if now != state.name else ""
        described.append(f"'{state.name}' ({state.layer_type}{moved})")
    warnings.warn(
        f"{len(frozen)} compressed layer(s) are frozen now (no parameter but a bias requires grad), so they keep "
        f"nothing of their input and compression saves nothing there: {', '.join(described)}. If they were frozen or "
        "wrapped after compress() (peft's get_peft_model freezes the base layers and adds trainable lora_A/lora_B), "
        "call actcomp.compress() on the final model: it compresses the trained layers and returns frozen ones to plain",
        FrozenLayerWarning,
        stacklevel=3,
    )


def _watches(hooks: dict) -> list:
    return [key for key, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), _Watch)]


def _attach_watch(model: nn.Module) -> _Watch:
    keys = _watches(model._forward_pre_hooks)
    if keys:
        return model._forward_pre_hooks[keys[0]].__self__
    watch = _Watch()
    model.register_forward_pre_hook(watch.enter)
    model.register_forward_hook(watch.leave, always_call=True)
    return watch


def _detach_watch(model: nn.Module) -> None:
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in _watches(hooks):
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
