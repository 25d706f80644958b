"""The optimizer step in backward (LOMO, Apple's MeBP): each parameter is updated, and its
gradient freed, as soon as that gradient is complete.

A plain step holds every parameter gradient at once: after ``loss.backward()`` the step's
backward peak includes sum_p |grad p|, and the optimizer then reads them all. An element-wise
optimizer (SGD, Adam, ...) updates parameter p from p's gradient and p's own state alone, so the
update can run inside backward, from ``Tensor.register_post_accumulate_grad_hook``, the moment
p's gradient has been accumulated; the gradient is then set to None. What backward holds of
parameter gradients drops from sum_p |grad p| to max_p |grad p| (plus the current one), and
the weights after each step are those of the plain loop: the same update runs on the same
gradient, with one optimizer per parameter built from the user's class and param-group
settings. It cannot be exact where the update of one parameter needs another's gradient:
global-norm clipping, optimizers that re-evaluate the loss (a closure), second-order optimizers
whose statistics span the step; those are refused by name. The update is in place, during
backward: an op that saved a detached view of a weight and runs its backward after that
weight's gradient is complete makes autograd raise its in-place error (never a silent use of
the new value).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

#: Optimizers whose update of a parameter reads only that parameter, its gradient and its own
#: state: one optimizer per parameter gives the weights of one optimizer over all of them.
EXACT_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Rprop,
)

#: the attribute of a parameter naming the handle that steps it. The hook is a module-level
#: function that looks its handle up there: a hook holding the handle (hence the parameter)
#: would make a cycle through the tensor's hook table, which the garbage collector cannot see.
_ATTRIBUTE = "_actcomp_step_in_backward"

#: elements per slice of a parameter's update (:func:`optimizer_in_backward` ``chunk_size``):
#: 2**18 float32 elements are 1 MiB, so Adam's temporaries (and moments cast up from bfloat16)
#: stay a few MiB for any parameter, at one optimizer call per slice.
DEFAULT_CHUNK_SIZE = 2**18

ParamsLike = nn.Module | Iterable[nn.Parameter] | Iterable[dict]
OptimizerLike = type[Optimizer] | Optimizer | Callable[..., Optimizer]


def _supported() -> str:
    return ", ".join(f"torch.optim.{c.__name__}" for c in EXACT_OPTIMIZERS)


def _check_class(cls: type) -> None:
    """Raise, naming the reason, for an optimizer class whose step cannot run per parameter."""
    if cls in EXACT_OPTIMIZERS:
        return
    if isinstance(cls, type) and issubclass(cls, torch.optim.LBFGS):
        raise ValueError(
            f"{cls.__name__} needs a closure that re-evaluates the loss over all parameters at once; "
            "its step cannot run per parameter inside backward"
        )
    if cls.__module__.startswith("actcomp.optim") or cls.__name__ in ("SINGD", "HyLo"):
        raise ValueError(
            f"{cls.__name__} is a second-order optimizer: its preconditioners come from statistics "
            "captured over the whole step, so its update cannot run per parameter inside backward"
        )
    raise TypeError(
        f"{getattr(cls, '__name__', cls)!r} is not known to update each parameter from its own gradient and "
        f"state alone; the step in backward supports exactly: {_supported()}"
    )


def _groups(model_or_params: ParamsLike) -> list[dict]:
    """Param groups (dicts with 'params' and their own settings) of trainable parameters."""
    if isinstance(model_or_params, nn.Module):
        items: list[Any] = list(model_or_params.parameters())
    elif isinstance(model_or_params, torch.Tensor):
        items = [model_or_params]
    else:
        items = list(model_or_params)
    if items and all(isinstance(g, dict) for g in items):
        groups = [dict(g) for g in items]
    elif all(isinstance(p, torch.Tensor) for p in items):
        groups = [{"params": items}]
    else:
        raise TypeError("give a module, an iterable of parameters, or an iterable of param-group dicts")
    seen: set[int] = set()
    for g in groups:
        params = g["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        kept = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                kept.append(p)
        g["params"] = kept
    return [g for g in groups if g["params"]]


def _step_hook(param: torch.Tensor) -> None:
    handle = getattr(param, _ATTRIBUTE, None)
    if handle is not None:
        handle._hook(param)


class StepInBackward:
    """What :func:`optimizer_in_backward` returns: the per-parameter optimizers and their hooks.

    ``optimizers`` maps each trainable parameter to its own optimizer. Use it as the optimizer
    of a plain loop (``loss.backward(); handle.step(); handle.zero_grad()``: the step already ran
    in backward, so ``step`` and ``zero_grad`` find nothing left to do), or drop those calls.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        optimizers: dict[nn.Parameter, Optimizer],
        state_dtype: torch.dtype | None = None,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if any(getattr(p, _ATTRIBUTE, None) is not None for p in params):
            raise ValueError("a parameter already steps in backward under another handle: remove() that one first")
        if state_dtype is not None and not state_dtype.is_floating_point:
            raise ValueError(f"state_dtype must be a floating-point dtype, got {state_dtype}")
        self.params = params
        self.optimizers = optimizers
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of elements or None, got {chunk_size!r}")
        self.state_dtype = state_dtype
        self.chunk_size = chunk_size
        self._stepped: set[int] = set()  # ids of the parameters updated once (their state exists)
        self._accumulating = 0
        for p in params:
            self._store(p)
        for p in params:
            setattr(p, _ATTRIBUTE, self)
        self._handles = [p.register_post_accumulate_grad_hook(_step_hook) for p in params]

    def _hook(self, param: torch.Tensor) -> None:
        if self._accumulating or param.grad is None:
            return  # micro-batches before the last: the gradient accumulates as in a plain loop
        self._step_one(param)

    def _step_one(self, param: torch.Tensor) -> None:
        """One parameter's update, its state in the parameter's dtype while it runs; then the
        gradient is freed and the state stored in ``state_dtype`` again. A parameter of more
        than ``chunk_size`` elements whose state exists is updated chunk by chunk."""
        optimizer = self.optimizers[param]
        state = optimizer.state.get(param, {})
        if self.chunk_size is not None and param.numel() > self.chunk_size and id(param) in self._stepped and _chunkable(state, param):
            _step_in_chunks(optimizer, param, self.chunk_size)
        else:
            if self.state_dtype is not None:
                _cast_state(state, param, param.dtype)
            optimizer.step()
            self._store(param)
            self._stepped.add(id(param))
        optimizer.zero_grad(set_to_none=True)

    def _store(self, param: torch.Tensor) -> None:
        if self.state_dtype is not None:
            _cast_state(self.optimizers[param].state.get(param, {}), param, self.state_dtype)

    @property
    def removed(self) -> bool:
        return not self._handles

    @property
    def param_groups(self) -> list[dict]:
        """Every per-parameter optimizer's param group (one each), e.g. to set the learning rate."""
        return [g for p in self.params for g in self.optimizers[p].param_groups]

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[StepInBackward]:
        """Context manager: backward passes inside it only accumulate gradients (no step, nothing
        freed); the first backward outside it steps on the accumulated sum, as a plain loop that
        calls ``step()`` after the last micro-batch does. Micro-batches but the last go inside."""
        self._accumulating += 1
        try:
            yield self
        finally:
            self._accumulating -= 1

    def step(self) -> None:
        """Step every parameter whose gradient is still held (after backward passes run inside
        :meth:`accumulating`), and free it; after a plain backward there is none: a no-op."""
        for p in self.params:
            if p.grad is not None:
                self._step_one(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients still held (none after a backward outside :meth:`accumulating`)."""
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def remove(self) -> None:
        """Remove the hooks: backward accumulates gradients and steps nothing, as plain autograd.
        The per-parameter optimizers (and their state) stay on this object."""
        for h in self._handles:
            h.remove()
        if self._handles:
            for p in self.params:
                if getattr(p, _ATTRIBUTE, None) is self:
                    delattr(p, _ATTRIBUTE)
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        """The per-parameter optimizers' state dicts, in parameter order."""
        return {"optimizers": [self.optimizers[p].state_dict() for p in self.params]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (same parameters, same order)."""
        states = state_dict["optimizers"]
        if len(states) != len(self.params):
            raise ValueError(f"the state dict holds {len(states)} optimizers; this handle has {len(self.params)} parameters")
        for p, s in zip(self.params, states):
            self.optimizers[p].load_state_dict(s)  # torch casts the state to the parameter's dtype
            self._store(p)


def _shaped(value: Any, param: torch.Tensor) -> bool:
    """A state tensor shaped like its parameter (a moment, a momentum buffer), not a scalar."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == param.shape


def _chunkable(state: dict[str, Any], param: torch.Tensor) -> bool:
    """The parameter, its gradient and every state tensor shaped like it are contiguous (the
    state exists: the first update creates it whole, by the optimizer's own rule)."""
    grad = param.grad
    return (
        param.is_contiguous()
        and grad is not None
        and grad.is_contiguous()
        and not grad.is_sparse
        and all(v.is_contiguous() for v in state.values() if _shaped(v, param))
    )


def _step_in_chunks(optimizer: Optimizer, param: torch.Tensor, chunk_size: int) -> None:
    """``optimizer.step()`` for its one parameter, run on consecutive slices of at most
    ``chunk_size`` elements of the flattened parameter, gradient and state.

    For an element-wise update p_i <- u(p_i, g_i, s_i; t) whose scalars (the step count t,
    NAdam's mu_product) are shared by every element, updating the slices one after another
    with the same scalars gives the same weights, element by element, as one update of the
    whole tensor, while the update's temporaries (Adam: sqrt(v) / c + eps, the step; the state
    cast up from ``state_dtype``) take the bytes of one slice instead of the whole parameter.
    Each slice runs through a fresh optimizer of the same class and param-group settings on a
    detached view of the parameter (it shares the parameter's version counter: autograd still
    sees the update); its state is views of the stored state (cast to the parameter's dtype and
    written back where stored in another one) and a copy of the scalars, which are then stored
    as the last slice left them (every slice advances them alike)."""
    state = optimizer.state[param]
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    flat_param, flat_grad = param.detach().view(-1), param.grad.detach().view(-1)
    scalars: dict[str, Any] = {}
    for start in range(0, param.numel(), chunk_size):
        stop = min(start + chunk_size, param.numel())
        chunk = flat_param[start:stop]
        chunk.grad = flat_grad[start:stop]
        views = {k: v.view(-1)[start:stop] for k, v in state.items() if _shaped(v, param)}
        work = {k: v if v.dtype == param.dtype else v.to(param.dtype) for k, v in views.items()}
        scalars = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items() if k not in views}
        sliced = type(optimizer)([{**group, "params": [chunk]}])
        sliced.state[chunk] = {**scalars, **work}
        sliced.step()
        after = sliced.state[chunk]
        for key, view in views.items():
            if after[key] is not view:
                view.copy_(after[key])  # stored in another dtype (or replaced by the step): write back
        scalars = {k: after[k] for k in scalars}
        chunk.grad = None
    for key, value in scalars.items():
        state[key] = value


def _cast_state(state: dict[str, Any], param: torch.Tensor, dtype: torch.dtype) -> None:
    """Cast in place (in the dict) the state tensors shaped like ``param`` (moments, momentum
    buffers) to ``dtype``; scalars such as Adam's step count keep theirs."""
    for key, value in state.items():
        if _shaped(value, param) and value.dtype != dtype:
            state[key] = value.to(dtype)


def optimizer_in_backward(
    model_or_params: ParamsLike,
    optimizer: OptimizerLike,
    *,
    max_grad_norm: float | None = None,
    state_dtype: torch.dtype | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    **settings: Any,
) -> StepInBackward:
    """Run the optimizer step inside backward, one parameter at a time, freeing each gradient.

    ``optimizer`` is an optimizer class with its settings as keyword arguments
    (``optimizer_in_backward(model, torch.optim.AdamW, lr=1e-3)``), a factory called with one
    param group (``functools.partial(AdamW, lr=1e-3)``), or an optimizer instance, whose param
    groups and per-parameter state are taken over (do not step that instance afterwards).
    ``model_or_params`` is a module, parameters, or param-group dicts whose own settings
    override ``settings``. For an element-wise update p <- u(p, g_p, s_p) with per-parameter
    state s_p (the classes of :data:`EXACT_OPTIMIZERS`), running u for each p from its
    post-accumulate-grad hook gives the same weights as ``loss.backward(); opt.step();
    opt.zero_grad()`` (tested in float64), while the backward holds at most one complete
    parameter gradient after its use instead of all of them: the term sum_p |g_p| of the
    backward peak becomes max_p |g_p|. Global-norm clipping (``max_grad_norm``) scales every
    g_p by a norm over all of them, known only after the last one: it cannot be combined and is
    refused (ValueError), as are closure optimizers (LBFGS) and actcomp's second-order SINGD /
    HyLo; any other class raises TypeError naming the supported ones. Micro-batches: run every
    backward but the last inside ``handle.accumulating()``. ``state_dtype`` (opt-in, e.g.
    ``torch.bfloat16``) stores every state tensor shaped like its parameter (moments, momentum
    buffers) in that dtype between steps: each update runs in the parameter's dtype on the
    state cast up (one parameter's state at a time, so the transient is that of the largest
    parameter) and is rounded to nearest when stored. Adam's state then takes 2 x 2 bytes per
    float32 weight instead of 2 x 4; the update is approximate (bfloat16 keeps 8 significant
    bits: each stored moment is off by up to 2^-9 of itself), no longer equal to the plain loop's.
    ``chunk_size`` (elements, default 2**18; None: off): from its second update on, a parameter
    with more elements is updated slice by slice, so the update's temporaries (Adam allocates
    sqrt(v) and the step, each the size of the parameter, plus the state cast up from
    ``state_dtype``) hold one slice at a time; the update is element-wise, so the weights are
    those of the whole-tensor update (tested in float64 and float32, bit for bit).
    """
    if max_grad_norm is not None:
        raise ValueError(
            "global-norm gradient clipping needs the norm over every parameter gradient before any "
            "step, but the step in backward updates each parameter as soon as its own gradient is "
            "complete: max_grad_norm cannot be combined with it (clip per layer or drop clipping)"
        )
    groups = _groups(model_or_params)
    source_state: dict[nn.Parameter, Any] = {}
    if isinstance(optimizer, Optimizer):
        instance = optimizer
        _check_class(type(instance))
        if settings:
            raise TypeError("with an optimizer instance, its param groups give the settings: pass no keyword settings")
        wanted = {id(p) for g in groups for p in g["params"]}
        if any(len(g) > 1 for g in groups):
            raise TypeError("with an optimizer instance, its own param groups give the settings: pass a module or parameters")
        groups = _groups([{**g, "params": [p for p in g["params"] if id(p) in wanted]} for g in instance.param_groups])
        source_state = dict(instance.state)
        defaults = dict(instance.defaults)

        def build(group: dict) -> Optimizer:
            return type(instance)([group], **defaults)

    elif isinstance(optimizer, type):
        if not issubclass(optimizer, Optimizer):
            raise TypeError(f"{optimizer!r} is not a torch.optim.Optimizer class")
        _check_class(optimizer)
        cls = optimizer

        def build(group: dict) -> Optimizer:
            return cls([group], **settings)

    elif callable(optimizer):
        factory = optimizer

        def build(group: dict) -> Optimizer:
            made = factory([group], **settings)
            if not isinstance(made, Optimizer):
                raise TypeError(f"the optimizer factory returned {type(made).__name__}, not a torch.optim.Optimizer")
            _check_class(type(made))
            return made

    else:
        raise TypeError("optimizer must be an Optimizer class, a factory of one, or an instance")
    params: list[nn.Parameter] = []
    optimizers: dict[nn.Parameter, Optimizer] = {}
    for group in groups:
        own = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            opt = build({"params": [p], **own})
            if p in source_state:
                opt.state[p] = source_state[p]
            params.append(p)
            optimizers[p] = opt
    return StepInBackward(params, optimizers, state_dtype=state_dtype, chunk_size=chunk_size)
