"""Recompute (activation checkpointing) of whole blocks, reversibly, with exact BatchNorm statistics.

A block run under non-reentrant ``torch.utils.checkpoint.checkpoint`` keeps for backward only
its inputs; everything its ops would save (and what actcomp's compressed layers and neighbour
policies keep: factors, masks, indices) is dropped after the forward and recomputed, block by
block, when backward reaches it. Gradients are those of the plain step (same ops on the same
inputs; the RNG state is replayed, so dropout draws the same mask). The forward's state changes
would run twice: a BatchNorm in train mode would update its running statistics (and
``num_batches_tracked``) a second time during the recompute, so they are saved before each
recompute and put back after it; they end as after one plain forward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint


class _KeepRunningStats:
    """Recompute context: the running statistics of every norm layer in ``module`` are saved
    on entry and restored on exit, so the recompute leaves them as the forward left them."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [
            (b, b.detach().clone())
            for m in self.module.modules()
            if isinstance(m, _NormBase)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buffer, value in self.saved:
                buffer.copy_(value)
        self.saved = []


def _contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _KeepRunningStats(module)


class CheckpointedForward:
    """The ``forward`` set on a checkpointed module's instance: its class's forward (looked up at
    each call, so :func:`actcomp.compress` may swap the class before or after) run under
    non-reentrant checkpointing while gradients are enabled, plainly otherwise."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        run = functools.partial(type(module).forward, module)
        if not torch.is_grad_enabled():
            return run(*args, **kwargs)
        return checkpoint(run, *args, use_reentrant=False, context_fn=functools.partial(_contexts, module), **kwargs)


class Recompute:
    """What :func:`checkpoint_blocks` returns: the checkpointed blocks; ``remove()`` undoes it."""

    def __init__(self, model: nn.Module, blocks: list[str]) -> None:
        self.model = model
        self.blocks = blocks

    def remove(self) -> None:
        """Give each block its plain forward back (idempotent)."""
        for name in self.blocks:
            module = self.model.get_submodule(name)
            if isinstance(module.__dict__.get("forward"), CheckpointedForward):
                del module.__dict__["forward"]
        self.blocks = []


def _composite(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _holds_blocks(module: nn.Module) -> bool:
    """An nn.Sequential / nn.ModuleList with at least two composite children."""
    return isinstance(module, (nn.Sequential, nn.ModuleList)) and sum(_composite(c) for c in module.children()) >= 2


def auto_blocks(model: nn.Module) -> list[str]:
    """The blocks ``checkpoint_blocks(model, "auto")`` picks. The rule: walk down from ``model``;
    at an ``nn.Sequential`` / ``nn.ModuleList`` holding at least two composite children (modules
    with submodules of their own: residual blocks, transformer layers, Conv-BN-ReLU groups),
    each composite child is a block, except one that is itself such a container, which is walked
    into; elsewhere every child is walked into; the walk never enters a block. ResNet: every
    BasicBlock / Bottleneck of layer1..layer4; MobileNetV2: the children of ``features``; a
    transformer: the layers of its ``ModuleList``; nn.Sequential(stem, nn.Sequential(*blocks),
    head): stem, each block, head. Single layers are never picked (checkpointing one saves
    nothing: its region keeps its input, as the layer itself did)."""
    found: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        holds = _holds_blocks(module)
        for n, child in module.named_children():
            if holds and _composite(child) and not _holds_blocks(child):
                found.append(f"{prefix}{n}")
            else:
                visit(f"{prefix}{n}.", child)

    visit("", model)
    return found


def checkpoint_blocks(model: nn.Module, blocks: str | Sequence[str] = "auto") -> Recompute:
    """Recompute the chosen blocks of ``model`` in backward instead of keeping what they save.

    ``blocks`` is ``"auto"`` (see :func:`auto_blocks`) or a list of qualified module names. Each
    block's forward runs under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``:
    of the tensors its ops save (in total S_b bytes, after whatever actcomp.compress keeps) only
    its inputs (I_b) stay alive, so the step keeps sum_b I_b + what is outside the blocks instead
    of sum_b S_b, and the backward's peak holds one block's S_b at a time, at the cost of one
    extra forward of every block. Gradients are exact (same ops, same inputs, replayed RNG),
    with compressed layers and neighbour policies inside a block too, whether compress is applied
    before or after (their decomposition then runs twice: at eps < 1 it must choose the same ranks,
    which it does on the same input). BatchNorm running statistics are restored around the
    recompute, so they are updated once per step, as without it. Methods that carry state from
    one forward to the next (asi's tracked subspaces) see the block twice. Returns a handle
    whose ``remove()`` restores the plain forwards. Deep-copy or pickle a model after ``remove()``
    or with the handle applied (the forward is an attribute of each block's instance).
    """
    names = auto_blocks(model) if blocks == "auto" else list(blocks) if not isinstance(blocks, str) else [blocks]
    if not names:
        raise ValueError(
            "checkpoint_blocks(model, 'auto') found no nn.Sequential / nn.ModuleList of composite blocks; "
            "pass the names of the modules to recompute"
        )
    if len(set(names)) != len(names):
        raise ValueError("a block is named twice")
    for name in names:
        for other in names:
            if other != name and (name == "" or other.startswith(name + ".")):
                raise ValueError(f"block {other!r} lies inside block {name!r}: name one of them")
    modules = [model.get_submodule(name) for name in names]  # AttributeError naming a missing one
    for name, module in zip(names, modules):
        if isinstance(module.__dict__.get("forward"), CheckpointedForward):
            raise ValueError(f"block {name!r} is already checkpointed")
        if "forward" in module.__dict__:
            raise ValueError(f"block {name!r} has a forward set on its instance already; cannot wrap it")
    for module in modules:
        module.__dict__["forward"] = CheckpointedForward(module)
    return Recompute(model, names)
