"""Recompute (activation checkpointing) of whole blocks and of runs of sibling modules,
reversibly, with exact BatchNorm statistics.

A block run under non-reentrant ``torch.utils.checkpoint.checkpoint`` keeps for backward only
its inputs; everything its ops would save (and what actcomp's compressed layers and neighbour
policies keep: factors, masks, indices) is dropped after the forward and recomputed, block by
block, when backward reaches it. A *region* is a run of sibling modules that their parent's
forward calls one after the other, each on the previous one's output (a ResNet stem:
``conv1 -> bn1 -> relu -> maxpool``, called one by one in ``ResNet.forward``): it is recomputed
the same way, from its first module's input (:class:`_Region`). Gradients are those of the plain step (same ops on the same
inputs; the RNG state is replayed, so dropout draws the same mask). The forward's state changes
would run twice: a BatchNorm in train mode would update its running statistics (and
``num_batches_tracked``) a second time during the recompute, so they are saved before each
recompute and put back after it; they end as after one plain forward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils import checkpoint as _torch_checkpoint
from torch.utils.checkpoint import checkpoint

from actcomp.core.batch import call_model


class _KeepRunningStats:
    """Recompute context: the running statistics of every norm layer in ``modules`` are saved
    on entry and restored on exit, so the recompute leaves them as the forward left them."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [
            (b, b.detach().clone())
            for module in self.modules
            for m in module.modules()
            if isinstance(m, _NormBase)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buffer, value in self.saved:
                buffer.copy_(value)
        self.saved = []


def _contexts(*modules: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _KeepRunningStats(*modules)


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


def _open_checkpoint(fn: Any, x: Tensor, context_fn: Any) -> Iterator[None]:
    """torch's non-reentrant checkpoint as a generator, entered at the first ``next``: the ops run
    until the second ``next`` are recorded as one checkpointed region (only ``x`` is saved; in
    backward ``fn(x)`` reruns them). The generator behind ``torch.utils.checkpoint.checkpoint``
    (``use_reentrant=False``) and torch's per-module composable checkpoint; it is private, so
    the call adapts to its signature: torch 2.x put ``early_stop`` before the inputs in 2.4 and
    split an ``_impl`` taking them as a tuple out later."""
    impl = getattr(_torch_checkpoint, "_checkpoint_without_reentrant_generator_impl", None)
    if impl is not None:
        return impl(fn, (x,), {}, preserve_rng_state=True, context_fn=context_fn)
    generator = _torch_checkpoint._checkpoint_without_reentrant_generator
    if "early_stop" in inspect.signature(generator).parameters:
        return generator(fn, True, context_fn, "default", False, True, x)
    return generator(fn, True, context_fn, "default", False, x)


def _rng_state(x: Tensor) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None


def _set_rng_state(state: tuple[Tensor, Tensor | None], x: Tensor) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], x.device)


def _keep(tensor: Tensor) -> Tensor:
    return tensor


class _RegionCall:
    """One forward of a region: the open checkpoint, how many members ran in it and the RNG
    state before each (the recompute replays each member's draws even if the parent's forward
    drew random numbers between two members)."""

    def __init__(self, region: "_Region", x: Tensor) -> None:
        self.region = region
        self.length = 0
        self.rng: list[tuple[Tensor, Tensor | None]] = []
        self.generator: Iterator[None] | None = _open_checkpoint(self.replay, x, functools.partial(_contexts, *region.modules))
        next(self.generator)

    def replay(self, x: Tensor) -> None:
        """The recompute: the members that ran, in order, each from the RNG state it saw."""
        for index in range(self.length):
            _set_rng_state(self.rng[index], x)
            x = self.region.run(index, x)

    def close(self) -> None:
        generator, self.generator = self.generator, None  # the frame holds replay (hence self): no cycle left
        if generator is not None:
            next(generator, None)


class _Region:
    """A run of sibling modules recomputed as one checkpointed region from its first input.

    While the parent's forward runs (:class:`_RegionParentForward`), the first member's call
    with one tensor opens a non-reentrant checkpoint; each next member must be called next,
    with exactly the previous member's output (``is``), and runs inside it; the last one's
    return closes it. So autograd keeps the first member's input only, and backward reruns the
    members on it. What the parent's forward does between two members is not recomputed: what
    it saves for backward is kept as plain autograd keeps it (no misaligned replay), and the
    RNG state of each member is replayed. A member called out of turn or on another tensor
    ends the region there with a warning: the members run so far stay recomputed, the rest run
    plainly (gradients stay exact). The region is only entered with gradients enabled."""

    def __init__(self, name: str, names: list[str], modules: list[nn.Module]) -> None:
        self.name, self.names, self.modules = name, names, modules
        self.armed = False
        self.call: _RegionCall | None = None
        self.next = 0
        self.last: Tensor | None = None
        self.between: Any = None
        self.siblings: list[_Region] = []  # the regions of the same parent (its _RegionParentForward's list)

    def run(self, index: int, *args: Any, **kwargs: Any) -> Any:
        module = self.modules[index]
        return type(module).forward(module, *args, **kwargs)

    def member_call(self, index: int, args: tuple, kwargs: dict) -> Any:
        one_tensor = len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
        if self.call is not None:
            self._leave_between()
            if index == self.next and one_tensor and args[0] is self.last:
                return self._run(index, args[0])
            what = "another tensor than" if index == self.next else f"out of turn after {self.names[self.next - 1]!r}, not on"
            warnings.warn(
                f"recompute region {self.name!r}: {self.names[index]!r} ({type(self.modules[index]).__name__}) was called with "
                f"{what} the output of {self.names[self.next - 1]!r}: the region ends before it (the rest runs plainly); "
                "name only modules that the parent's forward chains",
                stacklevel=3,
            )
            self.close()
        elif index == 0 and self.armed and one_tensor and torch.is_grad_enabled():
            for other in self.siblings:  # regions of one parent never interleave: saved-tensor hooks are a stack
                if other is not self and other.call is not None:
                    warnings.warn(f"recompute region {other.name!r} ends where region {self.name!r} begins", stacklevel=3)
                    other.close()
            self.call = _RegionCall(self, args[0])
            return self._run(0, args[0])
        return self.run(index, *args, **kwargs)

    def _run(self, index: int, x: Tensor) -> Any:
        assert self.call is not None
        self.call.rng.append(_rng_state(x))
        self.call.length = index + 1
        out = self.run(index, x)
        if index == len(self.modules) - 1 or not isinstance(out, Tensor):
            self.close()
        else:
            self.last, self.next = out, index + 1
            self.between = torch.autograd.graph.saved_tensors_hooks(_keep, _keep)
            self.between.__enter__()
        return out

    def _leave_between(self) -> None:
        between, self.between = self.between, None
        if between is not None:
            between.__exit__(None, None, None)

    def close(self) -> None:
        """End the open region (if any): the members run so far are what backward recomputes."""
        self._leave_between()
        call, self.call, self.last, self.next = self.call, None, None, 0
        if call is not None:
            call.close()


class _RegionMemberForward:
    """The ``forward`` set on a region member's instance: the region decides how it runs."""

    def __init__(self, region: _Region, index: int) -> None:
        self.region, self.index = region, index

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.region.member_call(self.index, args, kwargs)


class _RegionParentForward:
    """The ``forward`` set on a region's parent: its class's forward, during which its regions
    may open; any region still open when it returns or raises is closed (the region is then
    what ran of it)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.regions: list[_Region] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for region in self.regions:
            region.close()
            region.armed = True
        try:
            out = type(self.module).forward(self.module, *args, **kwargs)
        except BaseException:
            self._close_all()
            raise
        for region in reversed(self.regions):
            if region.call is not None:
                warnings.warn(
                    f"recompute region {region.name!r}: the forward of its parent returned before calling "
                    f"{region.names[region.next]!r}: the region ended there (the rest runs plainly)",
                    stacklevel=2,
                )
        self._close_all()
        return out

    def _close_all(self) -> None:
        for region in reversed(self.regions):
            region.close()
            region.armed = False


class Recompute:
    """What :func:`checkpoint_blocks` returns: the checkpointed blocks and regions (named as
    given); ``remove()`` undoes it."""

    def __init__(self, model: nn.Module, blocks: list[str]) -> None:
        self.model = model
        self.blocks = blocks

    def remove(self) -> None:
        """Give each block, region member and region parent its plain forward back (idempotent)."""
        for entry in self.blocks:
            for module in map(self.model.get_submodule, _members(entry)):
                if isinstance(module.__dict__.get("forward"), (CheckpointedForward, _RegionMemberForward)):
                    del module.__dict__["forward"]
            if "+" in entry:  # the parent keeps its wrapper while it has other regions
                parent = self.model.get_submodule(_parent_name(_members(entry)[0]))
                wrapper = parent.__dict__.get("forward")
                if isinstance(wrapper, _RegionParentForward):
                    wrapper.regions[:] = [r for r in wrapper.regions if r.name != entry]
                    if not wrapper.regions:
                        del parent.__dict__["forward"]
        self.blocks = []


def _members(entry: str) -> list[str]:
    """The module names of a ``checkpoint_blocks`` entry: a block's name, or a region's members
    (``"conv1+bn1+relu+maxpool"``)."""
    return entry.split("+")


def _parent_name(name: str) -> str:
    return name.rpartition(".")[0]


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


def auto_regions(model: nn.Module, inputs: Any, blocks: Sequence[str] | None = None) -> list[str]:
    """The runs of sibling modules ``checkpoint_blocks`` can recompute as regions, found by one
    forward of ``model`` on ``inputs`` (called as :func:`~actcomp.core.batch.call_model` calls
    it: a tensor, a tuple of positional inputs or a dict of keyword arguments) without
    gradients, running statistics and RNG state left as they were.

    A region is a maximal run of children of one module that its forward calls one after the
    other, each with exactly the previous one's output as its only argument (no other module
    call of that parent in between), each called once in the whole forward, none of them a
    block of ``blocks`` (default :func:`auto_blocks`), inside one or holding one; a run's
    leading in-place modules are dropped (the region's input must stay as saved), and runs of
    fewer than two modules are not regions (one module recomputed keeps its input, as it did).
    Recomputing a region of n members keeps its first input x_0 instead of what the members
    save (S_1 + ... + S_n) at the cost of rerunning them in backward. ResNet: the stem
    ``"conv1+bn1+relu+maxpool"`` (ResNet.forward calls them one by one; avgpool -> fc is cut
    by ``torch.flatten``); a Sequential of layers outside any block: its children. Returns
    entries for ``checkpoint_blocks`` (members joined by ``"+"``), in call order."""
    blocks = auto_blocks(model) if blocks is None else list(blocks)
    names = {id(m): n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    runs: dict[str, list[list[str]]] = {}  # parent name -> its runs of chained children
    last: dict[str, Tensor | None] = {}  # parent name -> the output of its last child call
    in_place: set[str] = set()
    stack: list[tuple[str | None, bool]] = []  # (module name, called directly by its parent)

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = names.get(id(module))
        caller = stack[-1][0] if stack else None
        direct = name is not None and caller is not None and name != "" and _parent_name(name) == caller
        stack.append((name, direct))
        if name is not None:
            calls[name] = calls.get(name, 0) + 1
        if caller is None:
            return
        if not direct:
            last[caller] = None  # a call of anything but a child cuts the parent's chain
            return
        chained = len(args) == 1 and not kwargs and isinstance(args[0], Tensor) and args[0] is last.get(caller)
        if chained:
            runs[caller][-1].append(name)
        else:
            runs.setdefault(caller, []).append([name])

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        name, direct = stack.pop()
        if direct:
            last[stack[-1][0]] = output if isinstance(output, Tensor) else None
            if len(args) == 1 and output is args[0]:
                in_place.add(name)

    handles = []
    params = next(model.parameters(), None)
    devices = [params.device] if params is not None and params.device.type == "cuda" else []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        with torch.no_grad(), _KeepRunningStats(model), torch.random.fork_rng(devices=devices):
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()

    def eligible(name: str) -> bool:
        return calls.get(name) == 1 and not any(name == b or _within(name, b) or _within(b, name) for b in blocks)

    found = []
    for run in (r for parent_runs in runs.values() for r in parent_runs):
        segment: list[str] = []
        for name in [*run, None]:
            if name is not None and eligible(name):
                if segment or name not in in_place:
                    segment.append(name)
                continue
            if len(segment) >= 2:
                found.append("+".join(segment))
            segment = []
    return found


def _within(name: str, outer: str) -> bool:
    """Module ``name`` lies strictly inside module ``outer``."""
    return outer == "" and name != "" or name.startswith(outer + ".")


def checkpoint_blocks(model: nn.Module, blocks: str | Sequence[str] = "auto") -> Recompute:
    """Recompute the chosen blocks and regions of ``model`` in backward instead of keeping what they save.

    ``blocks`` is ``"auto"`` (see :func:`auto_blocks`) or a list of entries: the qualified name
    of a module (a block), or the names of sibling modules joined by ``"+"`` in the order their
    parent's forward calls them (a region, see :func:`auto_regions`:
    ``"conv1+bn1+relu+maxpool"``). Each block's forward runs under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``; a region's members run under
    one such checkpoint opened by the first member's call and closed by the last one's (the
    parent's forward is unchanged; see :class:`_Region` for how a broken chain is handled). Of
    the tensors a block or region saves (in total S_b bytes, after whatever actcomp.compress
    keeps) only its input (I_b) stays alive, so the step keeps sum_b I_b + what is outside them
    instead of sum_b S_b, and the backward's peak holds one block's S_b at a time, at the cost of one
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
    for entry in names:
        members = _members(entry)
        if len(members) > 1 and (len(set(members)) != len(members) or len({_parent_name(m) for m in members}) != 1):
            raise ValueError(
                f"region {entry!r}: its members must be distinct siblings (children of one module, whose forward "
                "calls them in turn, each on the previous one's output)"
            )
    kind = {entry: "region" if "+" in entry else "block" for entry in names}
    for entry in names:
        for other in names:
            if other == entry:
                continue
            for name in _members(entry):
                for inner in _members(other):
                    if inner == name:
                        raise ValueError(f"{name!r} is in {kind[entry]} {entry!r} and in {kind[other]} {other!r}")
                    if name == "" or _within(inner, name):
                        raise ValueError(f"{kind[other]} {other!r} lies inside {kind[entry]} {entry!r}: name one of them")
    # AttributeError naming a missing one
    modules = {name: model.get_submodule(name) for entry in names for name in _members(entry)}
    parents = {entry: model.get_submodule(_parent_name(_members(entry)[0])) for entry in names if kind[entry] == "region"}
    for name, module in modules.items():
        if isinstance(module.__dict__.get("forward"), (CheckpointedForward, _RegionMemberForward)):
            raise ValueError(f"block {name!r} is already checkpointed")
        if "forward" in module.__dict__:
            raise ValueError(f"block {name!r} has a forward set on its instance already; cannot wrap it")
    for entry, parent in parents.items():
        if "forward" in parent.__dict__ and not isinstance(parent.__dict__["forward"], _RegionParentForward):
            raise ValueError(f"the parent of region {entry!r} ({type(parent).__name__}) has a forward set on its instance already; cannot wrap it")
    for entry in names:
        if kind[entry] == "block":
            modules[entry].__dict__["forward"] = CheckpointedForward(modules[entry])
            continue
        members = _members(entry)
        region = _Region(entry, members, [modules[m] for m in members])
        parent_forward = parents[entry].__dict__.setdefault("forward", _RegionParentForward(parents[entry]))
        parent_forward.regions.append(region)
        region.siblings = parent_forward.regions
        for index, name in enumerate(members):
            modules[name].__dict__["forward"] = _RegionMemberForward(region, index)
    return Recompute(model, names)
