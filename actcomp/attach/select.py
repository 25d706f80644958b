"""Which layers of a model to compress: the ``layers=`` argument of :func:`actcomp.compress`."""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from actcomp.core.batch import call_model
from actcomp.kernels import base_type, is_supported, overridden_base, qualified_name, registration_for, registration_hint, supported_types
from actcomp.core.state import KernelNotRunWarning, trains_weight

LayerSelector = str | Sequence[str] | Callable[[str, nn.Module], bool]


def describe(name: str, module: nn.Module) -> str:
    return f"layer '{name}' ({base_type(module).__name__})"


def _unsupported(name: str, module: nn.Module) -> ValueError:
    base = overridden_base(base_type(module))
    if base is not None:
        own = base_type(module)
        return ValueError(
            f"{describe(name, module)} is {qualified_name(own)}, a subclass of {base.__name__} that overrides forward, "
            f"so {base.__name__}'s compressed kernel may not compute what it computes; register it: "
            f"{registration_hint(own, base)}"
        )
    return ValueError(
        f"{describe(name, module)} has no compressed kernel; supported: {', '.join(supported_types())}"
    )


class OverriddenForwardWarning(UserWarning):
    """Layers left out of an automatic selection (``layers="all"``) because their class derives
    from a supported one but overrides its forward: the message names them and the fix
    (:func:`actcomp.register_layer`)."""


def _warn_overridden(modules: dict[str, nn.Module], layers: LayerSelector) -> None:
    found: dict[type, list[str]] = {}
    for name, module in modules.items():
        own = base_type(module)
        if overridden_base(own) is not None and trains_weight(module):
            found.setdefault(own, []).append(name)
    if not found:
        return
    parts = []
    for own, names in found.items():
        base = overridden_base(own)
        shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{len(names)} {qualified_name(own)} ({shown}), a subclass of {base.__name__} that overrides forward: {registration_hint(own, base)}")
    warnings.warn(
        f"layers={layers if isinstance(layers, str) else 'callable'!r} leaves out layers whose class overrides its "
        f"supported base's forward (they keep their inputs plain): {'; '.join(parts)}",
        OverriddenForwardWarning,
        stacklevel=4,
    )


@dataclass(frozen=True)
class Trace:
    """What one forward on a sample showed about a model.

    ``order``: module names in the order of their first call. ``readers``: supported layers
    whose own forward was never called while a torch function received their weight inside
    another module's forward (``name -> (reader module name, function name)``): the parent
    computes with ``layer.weight`` itself (swin's attention calls ``F.linear(x, qkv.weight)``,
    ``nn.MultiheadAttention`` passes ``out_proj.weight`` to its functional form), so the
    layer's compressed kernel cannot run under that forward. When the reader's own compressed
    kernel calls the layer's forward instead (:func:`runs_children`: actcomp's attention
    kernels call ``out_proj``, ``qkv`` and ``proj``), the layer runs once the reader is
    compressed too (:meth:`run_by`).
    """

    order: list[str]
    readers: dict[str, tuple[str, str]] = field(default_factory=dict)

    def run_by(self, name: str, modules: dict[str, nn.Module]) -> str | None:
        """The reader of layer ``name`` (one of ``readers``) whose compressed kernel calls the
        layer's forward (``reader.<child>`` with ``<child>`` in its :func:`runs_children`), or
        None when no kernel ever runs it."""
        reader, _ = self.readers[name]
        if not reader or not name.startswith(reader + "."):
            return None
        return reader if name[len(reader) + 1 :] in runs_children(modules[reader]) else None

    def reason(self, name: str, modules: dict[str, nn.Module]) -> str:
        """Why layer ``name`` (one of ``readers``) cannot be compressed, in words."""
        reader, function = self.readers[name]
        where = f"the forward of '{reader}'" if reader else "the model's own forward"
        return (
            f"{describe(name, modules[name])}: its own forward is never called, {where} "
            f"({base_type(modules[reader]).__name__}) uses its parameters itself (first in {function})"
        )


def runs_children(module: nn.Module) -> tuple[str, ...]:
    """The children whose own forward the compressed kernel of ``module``'s type calls where
    the plain forward reads their weights (the kernel's ``runs_children``: ``("out_proj",)``
    for ``nn.MultiheadAttention``, ``("qkv", "proj")`` for Swin's attention); () for others."""
    registration = registration_for(base_type(module))
    kernel = registration.kernel if registration is not None else None
    return tuple(getattr(kernel, "runs_children", ()))


def _parents_selected(chosen: list[str], run_by: dict[str, str], modules: dict[str, nn.Module], explicit: bool, layers: LayerSelector) -> list[str]:
    """``chosen`` without the layers whose parent's kernel runs them (``run_by``: layer ->
    parent) while that parent is neither chosen nor compressed already: their forward would
    never be called. Named explicitly they raise ValueError; an automatic selection leaves
    them out with a KernelNotRunWarning."""
    picked = set(chosen)
    orphans = [
        n for n in chosen
        if n in run_by and run_by[n] not in picked and not hasattr(type(modules[run_by[n]]), "_actcomp_base")
    ]
    if not orphans:
        return chosen
    reasons = "; ".join(
        f"{describe(n, modules[n])} is called only by the compressed kernel of its parent '{run_by[n]}' "
        f"({base_type(modules[run_by[n]]).__name__})" for n in orphans
    )
    if explicit:
        raise ValueError(f"{reasons}: select the parent too (layers=[..., '{run_by[orphans[0]]}']), or leave the layer out")
    warnings.warn(
        f"layers={layers if isinstance(layers, str) else 'callable'!r} leaves out {len(orphans)} layer(s) whose parent is "
        f"not selected: {reasons}; select the parent too to compress them",
        KernelNotRunWarning,
        stacklevel=3,
    )
    return [n for n in chosen if n not in orphans]


def _function_name(module: str, name: str) -> str:
    """A torch function's public name: ``torch.nn.functional.linear``, ``torch.addmm``."""
    if module.startswith("torch._C._nn"):
        return f"torch.nn.functional.{name}"
    if not module or module.startswith("torch._C"):
        return f"torch.{name}"
    return f"{module}.{name}"


class _WeightReads(TorchFunctionMode):
    """Records, for each torch function call, the supported layers whose parameters it
    receives while their own forward is not running."""

    def __init__(self, owners: dict[int, str], stack: list[str]) -> None:
        super().__init__()
        self.owners, self.stack = owners, stack
        self.reads: dict[str, tuple[str, str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name != "__get__":  # attribute reads (t.dtype, t.shape) compute nothing
            for leaf in pytree.tree_leaves((args, kwargs)):
                owner = self.owners.get(id(leaf)) if isinstance(leaf, Tensor) else None
                if owner is not None and owner not in self.stack and owner not in self.reads:
                    module = getattr(func, "__module__", None) or ""
                    qualified = _function_name(module, name)
                    self.reads[owner] = (self.stack[-1] if self.stack else "", qualified)
        return func(*args, **kwargs)


def trace(model: nn.Module, sample: object) -> Trace:
    """One forward of ``model`` on ``sample``: the modules' call order and the supported layers
    whose weight another module's forward uses while their own forward never runs.

    The forward runs in eval mode under no_grad (running statistics are not touched) and the
    model's train/eval flags are put back afterwards. ``sample`` is a tensor, a tuple of
    positional arguments, or a dict of keyword arguments (a Hugging Face ``BatchEncoding``).
    Weight reads are seen through a ``TorchFunctionMode``: a torch
    function that receives a layer's parameter while that layer's forward is not on the call
    stack reads it from outside.
    """
    order: list[str] = []
    seen: set[str] = set()
    stack: list[str] = []
    named = dict(model.named_modules())
    names = {id(m): n for n, m in named.items()}
    owners = {id(p): n for n, m in named.items() if is_supported(type(m)) for p in m.parameters(recurse=False)}

    def enter(module: nn.Module, _inputs: object) -> None:
        name = names[id(module)]
        stack.append(name)
        if name not in seen:
            seen.add(name)
            order.append(name)

    def leave(module: nn.Module, _inputs: object, _output: object) -> None:
        stack.pop()

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave, always_call=True) for m in model.modules()]
    reads = _WeightReads(owners, stack)
    try:
        model.eval()
        with torch.no_grad(), reads:
            call_model(model, sample)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    readers = {n: reads.reads[n] for n in named if n in reads.reads and n not in seen}
    return Trace(order, readers)


def execution_order(model: nn.Module, sample: object) -> list[str]:
    """Names of the modules in the order of their first call in one forward on ``sample``
    (see :func:`trace`)."""
    return trace(model, sample).order


def select_layers(model: nn.Module, layers: LayerSelector, sample: object = None, *, traced: Trace | None = None) -> list[str]:
    """Resolve a layer selection to qualified module names, each with a compressed kernel.

    ``"all"``: every module whose type has a kernel. ``"last:N"``: the last N of those in
    execution order when ``sample`` is given (modules the sample's forward never calls are left
    out), else in module registration order. ``"re:<pattern>"``: those whose qualified name
    matches the pattern (``re.search``). A callable ``(name, module) -> bool``: those it
    accepts. A list of names: exactly those, each of which must exist and have a kernel.
    The automatic selections only ever pick supported layers, and of those only the trained
    ones (a parameter other than the bias requires grad) when any is: a frozen layer keeps
    nothing of its input anyway (the base layers of a PEFT LoRA model). An explicit name that
    is unknown or has no kernel, or a selection that picks nothing, raises ValueError.

    With ``sample`` (or its ``traced`` forward), layers whose weight another module's forward
    uses while their own forward never runs (:class:`Trace` ``readers``) are left out of the
    automatic selections with a :class:`~actcomp.core.state.KernelNotRunWarning` naming them, and
    raise ValueError when listed by name: their compressed kernel could never run. A layer
    whose reader's compressed kernel calls its forward (:meth:`Trace.run_by`: the projections
    of ``nn.MultiheadAttention`` and Swin's attention) is selected like any other, provided its
    reader is selected (or compressed) too; else it is left out with a warning, or raises when
    named.
    """
    if traced is None and sample is not None:
        traced = trace(model, sample)
    modules = dict(model.named_modules())
    supported = [n for n, m in modules.items() if is_supported(type(m))]
    if not isinstance(layers, (list, tuple)):
        _warn_overridden(modules, layers)
        trained = [n for n in supported if trains_weight(modules[n])]
        supported = trained or supported  # a wholly frozen model (a layer alone): as it is, they keep nothing
    readers = traced.readers if traced is not None else {}
    run_by = {n: parent for n in readers if (parent := traced.run_by(n, modules)) is not None}
    blocked = {n: reader for n, reader in readers.items() if n not in run_by}
    if blocked and not isinstance(layers, (list, tuple)):
        left_out = [n for n in supported if n in blocked]
        supported = [n for n in supported if n not in blocked]
        if left_out and not (isinstance(layers, str) and layers.startswith("last:")):
            warnings.warn(
                f"layers={layers if isinstance(layers, str) else 'callable'!r} leaves out {len(left_out)} layer(s) whose "
                f"compressed kernel cannot run: {'; '.join(traced.reason(n, modules) for n in left_out)}. "
                "Their parent's ops keep what they need (Neighbours(generic=True) packs it)",
                KernelNotRunWarning,
                stacklevel=3,
            )

    def check(name: str, module: nn.Module) -> None:
        if not is_supported(type(module)):
            raise _unsupported(name, module)
        if name in blocked:
            raise ValueError(f"{traced.reason(name, modules)}, so its compressed kernel cannot run; leave it out (layers='all' does)")

    chosen = resolve_selection(
        layers,
        modules,
        supported,
        lambda: traced.order if traced is not None else list(modules),
        check,
        counted="with a compressed kernel",
        noun="layer with a compressed kernel",
        supported=", ".join(supported_types()),
    )
    return _parents_selected(chosen, run_by, modules, isinstance(layers, (list, tuple)), layers)


def resolve_selection(
    layers: LayerSelector,
    modules: dict[str, nn.Module],
    candidates: list[str],
    order: Callable[[], list[str]],
    check: Callable[[str, nn.Module], None],
    *,
    counted: str,
    noun: str,
    supported: str,
) -> list[str]:
    """The one reading of the ``layers=`` syntax (``compress``, ``svd_adapt``): qualified
    names, in order and without repeats.

    ``modules``: the model's modules by name; ``candidates``: the names the automatic
    selections (``"all"``, ``"last:N"``, ``"re:<pattern>"``, a callable ``(name, module) ->
    bool``) pick from; ``order()``: module names in the order ``"last:N"`` counts in (asked
    only for it); ``check(name, module)`` raises ValueError for a name listed explicitly that
    may not be chosen. ``counted``, ``noun`` and ``supported`` word the errors: "the model has
    N {counted} ({supported})", "selects no {noun} (supported: {supported})".
    """
    if isinstance(layers, str):
        if layers == "all":
            chosen = list(candidates)
        elif layers.startswith("last:"):
            count_text = layers[len("last:") :]
            if not count_text.isdigit() or int(count_text) < 1:
                raise ValueError(f"layers='last:N' needs a whole number N >= 1, got {layers!r}")
            count = int(count_text)
            allowed = set(candidates)
            ordered = [n for n in order() if n in allowed]
            if count > len(ordered):
                raise ValueError(f"layers={layers!r} asks for {count} layers but the model has {len(ordered)} {counted} ({supported})")
            chosen = ordered[-count:]
        elif layers.startswith("re:"):
            pattern = re.compile(layers[len("re:") :])
            chosen = [n for n in candidates if pattern.search(n)]
        else:
            raise ValueError(
                f"layers={layers!r} is not understood: use 'all', 'last:N', 're:<pattern>', "
                "a list of module names or a callable(name, module) -> bool"
            )
    elif callable(layers):
        chosen = [n for n in candidates if layers(n, modules[n])]
    elif not hasattr(layers, "__iter__") or not all(isinstance(n, str) for n in layers):
        raise ValueError(
            f"layers={layers!r} is not understood: use 'all', 'last:N', 're:<pattern>', "
            "a list of module names or a callable(name, module) -> bool"
        )
    else:
        chosen = []
        for name in layers:
            if name not in modules:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"model has no layer named {name!r}{hint}")
            check(name, modules[name])
            chosen.append(name)
    if not chosen:
        raise ValueError(f"layers={layers!r} selects no {noun} (supported: {supported})")
    return list(dict.fromkeys(chosen))
