"""Which layers of a model to compress: the ``layers=`` argument of :func:`actcomp.compress`."""

from __future__ import annotations

import difflib
import re
from typing import Callable, Sequence

import torch
from torch import nn

from actcomp.kernels import base_type, is_supported, supported_types

LayerSelector = str | Sequence[str] | Callable[[str, nn.Module], bool]


def describe(name: str, module: nn.Module) -> str:
    return f"layer '{name}' ({base_type(module).__name__})"


def _unsupported(name: str, module: nn.Module) -> ValueError:
    return ValueError(
        f"{describe(name, module)} has no compressed kernel; supported: {', '.join(supported_types())}"
    )


def execution_order(model: nn.Module, sample: object) -> list[str]:
    """Names of the modules in the order of their first call in one forward on ``sample``.

    The forward runs in eval mode under no_grad (running statistics are not touched) and the
    model's train/eval flags are put back afterwards. ``sample`` is a tensor, or a tuple of
    positional arguments.
    """
    order: list[str] = []
    seen: set[str] = set()
    names = {id(m): n for n, m in model.named_modules()}

    def record(module: nn.Module, _inputs: object) -> None:
        name = names[id(module)]
        if name not in seen:
            seen.add(name)
            order.append(name)

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*sample) if isinstance(sample, tuple) else model(sample)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return order


def select_layers(model: nn.Module, layers: LayerSelector, sample: object = None) -> list[str]:
    """Resolve a layer selection to qualified module names, each with a compressed kernel.

    ``"all"``: every module whose type has a kernel. ``"last:N"``: the last N of those in
    execution order when ``sample`` is given (modules the sample's forward never calls are left
    out), else in module registration order. ``"re:<pattern>"``: those whose qualified name
    matches the pattern (``re.search``). A callable ``(name, module) -> bool``: those it
    accepts. A list of names: exactly those, each of which must exist and have a kernel.
    The automatic selections only ever pick supported layers; an explicit name that is unknown
    or has no kernel, or a selection that picks nothing, raises ValueError.
    """
    modules = dict(model.named_modules())
    supported = [n for n, m in modules.items() if is_supported(type(m))]

    if isinstance(layers, str):
        if layers == "all":
            chosen = supported
        elif layers.startswith("last:"):
            count_text = layers[len("last:") :]
            if not count_text.isdigit() or int(count_text) < 1:
                raise ValueError(f"layers='last:N' needs a whole number N >= 1, got {layers!r}")
            count = int(count_text)
            order = execution_order(model, sample) if sample is not None else list(modules)
            candidates = set(supported)
            ordered = [n for n in order if n in candidates]
            if count > len(ordered):
                raise ValueError(
                    f"layers={layers!r} asks for {count} layers but the model has {len(ordered)} "
                    f"with a compressed kernel ({', '.join(supported_types())})"
                )
            chosen = ordered[-count:]
        elif layers.startswith("re:"):
            pattern = re.compile(layers[len("re:") :])
            chosen = [n for n in supported if pattern.search(n)]
        else:
            raise ValueError(
                f"layers={layers!r} is not understood: use 'all', 'last:N', 're:<pattern>', "
                "a list of module names or a callable(name, module) -> bool"
            )
    elif callable(layers):
        chosen = [n for n in supported if layers(n, modules[n])]
    else:
        chosen = []
        for name in layers:
            if name not in modules:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"model has no layer named {name!r}{hint}")
            if not is_supported(type(modules[name])):
                raise _unsupported(name, modules[name])
            chosen.append(name)
    if not chosen:
        raise ValueError(
            f"layers={layers!r} selects no layer with a compressed kernel "
            f"(supported: {', '.join(supported_types())})"
        )
    return list(dict.fromkeys(chosen))
