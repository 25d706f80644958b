"""svd_adapt / merge: turn chosen layers into SVD-parametrised ones in place, and back.

svd_adapt factors each chosen layer's weight once, W0 = U0 diag(s0) V0^T (thin SVD computed
in float64, stored in the weight's dtype), and swaps the module's class for its
SVD-parametrised subclass (:mod:`actcomp.peft.layers`): the same module object, its bias and
every other parameter and buffer untouched, ``isinstance`` checks unchanged; only ``weight``
becomes a computed, read-only property and the state_dict key ``weight`` is replaced by ``s``,
``reflectors`` (with train "s+q"), ``u0`` and ``v0``. merge computes W once more, swaps the
class back and stores W as the plain ``weight`` parameter, so the model exports and loads
like the original architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from actcomp.attach.select import LayerSelector, execution_order, resolve_selection
from actcomp.attach.swap import layer_state
from actcomp.peft.householder import DEFAULT_BLOCK_SIZE
from actcomp.peft.layers import SIDES, SVDWeight, adaptable_type_names, svd_class_for

TRAIN_MODES = ("s", "s+q")
DEFAULT_REFLECTIONS = 8


@dataclass(frozen=True)
class AdaptedLayer:
    """How one layer is parametrised: rank k = min(out, in), r reflections on ``side`` (acting
    on R^out or R^in), what trains, and the number of trainable parameters it holds."""

    rank: int
    reflections: int
    side: str
    train: str
    trainable_params: int


def _describe(name: str, module: nn.Module) -> str:
    return f"layer '{name}' ({type(module).__name__})"


def _adaptable(module: nn.Module) -> bool:
    return svd_class_for(type(module)) is not None


def select_adaptable(model: nn.Module, layers: LayerSelector, sample: object = None) -> list[str]:
    """Resolve ``layers`` to qualified names of adaptable modules (exactly nn.Linear, nn.Conv2d
    or transformers' Conv1D), as :func:`actcomp.compress` does: ``"all"``, ``"last:N"``
    (execution order with ``sample``, else module order), ``"re:<pattern>"``, a callable
    ``(name, module) -> bool`` or a list of names (each must exist and be adaptable)."""
    modules = dict(model.named_modules())
    supported = ", ".join(adaptable_type_names())

    def check(name: str, module: nn.Module) -> None:
        if isinstance(module, SVDWeight):
            raise ValueError(f"{_describe(name, module)} is already SVD-parametrised; merge(model) first to adapt it anew")
        if layer_state(module) is not None:
            raise ValueError(
                f"{_describe(name, module)} is compressed; call actcomp.restore(model), then svd_adapt, then compress again"
            )
        if not _adaptable(module):
            raise ValueError(f"{_describe(name, module)} cannot be SVD-parametrised; supported: {supported} (exact classes)")

    return resolve_selection(
        layers,
        modules,
        [n for n, m in modules.items() if _adaptable(m)],
        lambda: execution_order(model, sample) if sample is not None else list(modules),
        check,
        counted="adaptable ones",
        noun="adaptable layer",
        supported=supported,
    )


def _tied(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> every qualified name it is reachable by (more than one: shared/tied)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _initial_reflectors(count: int, dim: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` unit vectors of length ``dim`` in equal pairs (rows 2i and 2i+1 equal), so the
    product of their reflections is the identity: H(v) H(v) = I."""
    half = torch.randn(count // 2, dim, generator=generator, dtype=torch.float64)
    half = half / half.norm(dim=1, keepdim=True)
    return half.repeat_interleave(2, dim=0).to(dtype=like.dtype, device=like.device)


def _adapt_module(module: nn.Module, reflections: int, train: str, side: str, block_size: int, generator: torch.Generator | None) -> None:
    cls = svd_class_for(type(module))
    weight = module.weight
    matrix = cls.matrix_of(module, weight.detach())
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    dtype = weight.dtype
    del module._parameters["weight"]
    module.__class__ = cls
    module.register_buffer("u0", u.to(dtype).contiguous())
    module.register_buffer("v0", vh.T.to(dtype).contiguous())
    module.s = nn.Parameter(s.to(dtype))
    if reflections:
        dim = u.shape[0] if side == "out" else vh.shape[1]
        module.reflectors = nn.Parameter(_initial_reflectors(reflections, dim, weight, generator))
    else:
        module.register_parameter("reflectors", None)
    module.svd_side = side
    module.svd_block_size = block_size


def svd_adapt(
    model: nn.Module,
    layers: LayerSelector = "all",
    reflections: int | None = None,
    train: str = "s+q",
    *,
    side: str = "out",
    block_size: int = DEFAULT_BLOCK_SIZE,
    sample: object = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """SVD-parametrise the selected layers in place for parameter-efficient fine-tuning.

    Each layer's weight matrix W0 (out x in; a Conv2d's over in/groups * kh * kw, a Conv1D's
    transposed) is factored W0 = U0 diag(s0) V0^T and becomes W = (Q U0) diag(s) V0^T (``side=
    "out"``) or U0 diag(s) (Q V0)^T (``side="in"``), Q = H(v_1) ... H(v_r) in blocked WY form.
    ``train="s"`` trains the k singular values only (no reflections); ``"s+q"`` trains s and
    ``reflections`` vectors (default 8; even, since they start in equal pairs so that Q = I and
    W(init) = W0 up to round-off). U0, V0 are frozen buffers; the bias keeps its
    ``requires_grad``. ``generator`` seeds the vectors (else the global RNG). Refused by name:
    a layer already adapted or compressed, a weight shared with another module (adapting would
    untie it), a selection that picks nothing. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"svd_adapt needs a torch.nn.Module, got {type(model).__name__}")
    if train not in TRAIN_MODES:
        raise ValueError(f"train={train!r} is not one of {TRAIN_MODES}: 's' trains singular values, 's+q' also reflections")
    if side not in SIDES:
        raise ValueError(f"side={side!r} is not one of {SIDES}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if reflections is None:
        reflections = DEFAULT_REFLECTIONS if train == "s+q" else 0
    if train == "s" and reflections:
        raise ValueError(f"train='s' trains only the singular values, so reflections={reflections} would stay the identity; use train='s+q' or reflections=0")
    if train == "s+q" and (reflections < 2 or reflections % 2):
        raise ValueError(f"reflections must be a positive even number with train='s+q' (they start in equal pairs), got {reflections}")
    names = select_adaptable(model, layers, sample)
    modules = dict(model.named_modules())
    shared = _tied(model)
    for name in names:
        weight = modules[name].weight
        holders = shared.get(id(weight), [])
        if len(holders) > 1:
            raise ValueError(
                f"{_describe(name, modules[name])}: its weight is shared by {', '.join(holders)} (tied); "
                "adapting it would untie them: leave it out of layers="
            )
    for name in names:
        _adapt_module(modules[name], reflections, train, side, block_size, generator)
    return model


def _settings(module: SVDWeight) -> AdaptedLayer:
    r = 0 if module.reflectors is None else module.reflectors.shape[0]
    trained = "s+q" if r else "s"
    params = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)  # type: ignore[attr-defined]
    return AdaptedLayer(rank=module.s.shape[0], reflections=r, side=module.svd_side, train=trained, trainable_params=params)


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """The SVD-parametrised layers of ``model`` by qualified name, with their settings."""
    return {name: _settings(m) for name, m in model.named_modules() if isinstance(m, SVDWeight)}


def merge(model: nn.Module) -> nn.Module:
    """Turn every SVD-parametrised layer back into its plain class, in place, for export.

    Each layer's W = (Q U0) diag(s) V0^T (or the "in" form) is computed once and stored as its
    ``weight`` parameter in the base layout (requires_grad as s had it); ``s``, ``reflectors``,
    ``u0``, ``v0`` are removed. The merged model computes what the adapted one computed (to
    float round-off) and its state_dict has the original keys. A compressed adapted layer is
    refused: call actcomp.restore(model) first. Returns ``model``.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, SVDWeight)]
    for name, module in found:
        if layer_state(module) is not None:
            raise ValueError(f"{_describe(name, module)} is compressed; call actcomp.restore(model) before merge(model)")
    for _, module in found:
        with torch.no_grad():
            weight = module.weight.detach().clone().contiguous()
        requires_grad = module.s.requires_grad
        base = module.svd_base
        for key in ("s", "reflectors"):
            del module._parameters[key]
        for key in ("u0", "v0"):
            del module._buffers[key]
        del module.svd_side, module.svd_block_size
        module.__class__ = base
        # weight first again, as the base classes create it: state_dict keys in their own order
        module._parameters = {"weight": nn.Parameter(weight, requires_grad=requires_grad), **module._parameters}
    return model
