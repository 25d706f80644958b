"""measure(): what one training step really keeps, per module, next to plain autograd.

Saved bytes are counted through ``torch.autograd.graph.saved_tensors_hooks`` once per storage
and attributed to the innermost module running when autograd first saved that storage (a
ReLU's output that the next conv also keeps is the ReLU's); what the loss keeps is the row
``(loss)``, what a container's own forward code keeps is that container's row. The peak is the
allocator's high-water mark over forward+backward above what was allocated before: on CUDA from
``torch.cuda.max_memory_allocated``, on CPU from the allocation events of ``torch.profiler``
(private profiler API: where it is missing, ``peak_bytes`` is None and ``peak_source`` says so).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from actcomp.attach.swap import compressed_layers, layer_state, suspended
from actcomp.policies import NeighbourState
from actcomp.kernels import base_type
from actcomp.core.batch import batch_bytes, call_model, probe_loss
from actcomp.core.dispatch import kept_policy, kept_tensors, observing
from actcomp.memory.format import aligned_table

LOSS_ROW = "(loss)"
OUTSIDE_ROW = "(outside modules)"


@dataclass
class ModuleMemory:
    """One row: bytes autograd kept for one module, compressed and with plain autograd."""

    name: str
    layer_type: str
    kind: str  # "compressed", "neighbour" (a policy module), "plain" or "other" (loss, functional code)
    saved_bytes: int
    vanilla_saved_bytes: int | None = None
    policy: str = ""  # how what it kept was kept: factors, bits, indices, nothing, packed, plain (joined with +)

    @property
    def ratio(self) -> float | None:
        if not self.vanilla_saved_bytes:
            return None
        return self.saved_bytes / self.vanilla_saved_bytes


@dataclass
class MemoryReport:
    """What one training step keeps. All figures in bytes.

    ``saved_bytes``: everything autograd kept for backward (parameters excluded), the sum of
    ``rows``. ``peak_bytes``: allocator high-water mark of forward+backward above the baseline
    (includes gradients, the decomposition's transient workspace and every temporary).
    ``weights_bytes``, ``grads_bytes`` (trainable parameters), ``optimizer_state_bytes`` (0
    without an optimizer). ``vanilla_*``: the same step with compression suspended.
    ``forward_peak_bytes``: the peak of the same forward without gradients.
    ``buffers_bytes``: the model's buffers (BatchNorm statistics, ...); ``batch_bytes``: the
    step's inputs and targets; ``saved_by_policy``: ``saved_bytes`` split by how it was kept
    (factors, bits, indices, packed, plain, ...). :attr:`device_total_bytes` is what a device
    must hold for the step: resident bytes + the peak.
    """

    device: str
    rows: list[ModuleMemory]
    saved_bytes: int
    peak_bytes: int | None
    peak_source: str
    weights_bytes: int
    grads_bytes: int
    optimizer_state_bytes: int
    vanilla_saved_bytes: int | None = None
    vanilla_peak_bytes: int | None = None
    forward_peak_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    buffers_bytes: int = 0
    batch_bytes: int = 0
    saved_by_policy: dict[str, int] = field(default_factory=dict)

    @property
    def resident_bytes(self) -> int:
        """Held for the whole step: weights + buffers + optimizer state + the batch."""
        return self.weights_bytes + self.buffers_bytes + self.optimizer_state_bytes + self.batch_bytes

    @property
    def device_total_bytes(self) -> int | None:
        """The device total of one step: :attr:`resident_bytes` + the allocator peak of
        forward+backward above them (None without a peak figure). The peak holds what autograd
        keeps, the parameter gradients and every transient (a layer's input and output alive
        together, the decomposition's workspace, the gradient of the current activation)."""
        return None if self.peak_bytes is None else self.resident_bytes + self.peak_bytes

    @property
    def transient_bytes(self) -> int | None:
        """The part of the peak that is neither kept for backward nor a parameter gradient:
        peak - saved - gradients (at least 0; None without a peak figure)."""
        return None if self.peak_bytes is None else max(0, self.peak_bytes - self.saved_bytes - self.grads_bytes)

    @property
    def peak_set_by_forward(self) -> bool | None:
        """True when the step's peak is within 10% of a forward without gradients: then the
        peak comes from the forward (frozen layers, transient outputs), not from what backward
        keeps, and compressing more will not lower it. None without both peaks."""
        if self.peak_bytes is None or self.forward_peak_bytes is None:
            return None
        return self.peak_bytes <= 1.1 * self.forward_peak_bytes

    @property
    def step_bytes(self) -> int:
        """Weights + gradients + optimizer state + what autograd keeps: the step's resident
        memory, the figure a budget is checked against (the peak adds temporaries)."""
        return self.weights_bytes + self.grads_bytes + self.optimizer_state_bytes + self.saved_bytes

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["step_bytes"] = self.step_bytes
        out["resident_bytes"] = self.resident_bytes
        out["device_total_bytes"] = self.device_total_bytes
        out["transient_bytes"] = self.transient_bytes
        out["peak_set_by_forward"] = self.peak_set_by_forward
        for row, data in zip(self.rows, out["rows"]):
            data["ratio"] = row.ratio
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def table(self) -> str:
        """The per-module rows and the totals as aligned text."""
        have_vanilla = self.vanilla_saved_bytes is not None
        header = ["module", "type", "kind", "policy", "saved"] + (["plain", "ratio"] if have_vanilla else [])
        lines = []
        for row in self.rows:
            line = [row.name, row.layer_type, row.kind, row.policy, format_bytes(row.saved_bytes)]
            if have_vanilla:
                plain = row.vanilla_saved_bytes
                line += [format_bytes(plain) if plain is not None else "-", f"{row.ratio:.3f}" if row.ratio is not None else "-"]
            lines.append(line)
        total = ["total", "", "", "", format_bytes(self.saved_bytes)]
        if have_vanilla:
            total += [format_bytes(self.vanilla_saved_bytes), f"{self.saved_bytes / self.vanilla_saved_bytes:.3f}" if self.vanilla_saved_bytes else "-"]
        text = [aligned_table(header, lines, footer=total)]
        peak = format_bytes(self.peak_bytes) if self.peak_bytes is not None else "n/a"
        summary = f"peak {peak} ({self.peak_source})"
        if self.vanilla_peak_bytes is not None:
            summary += f", plain {format_bytes(self.vanilla_peak_bytes)}"
        if self.forward_peak_bytes is not None:
            summary += f", forward alone {format_bytes(self.forward_peak_bytes)}"
        text.append(
            f"{summary}; weights {format_bytes(self.weights_bytes)}, grads {format_bytes(self.grads_bytes)}, "
            f"optimizer state {format_bytes(self.optimizer_state_bytes)}, step total {format_bytes(self.step_bytes)}"
        )
        if self.device_total_bytes is not None:
            text.append(
                f"device total {format_bytes(self.device_total_bytes)} = resident {format_bytes(self.resident_bytes)} (weights, "
                f"buffers {format_bytes(self.buffers_bytes)}, optimizer state, batch {format_bytes(self.batch_bytes)}) + peak; "
                f"the peak holds saved {format_bytes(self.saved_bytes)}, grads {format_bytes(self.grads_bytes)} and transients "
                f"{format_bytes(self.transient_bytes or 0)}"
            )
        text += [f"note: {n}" for n in self.notes]
        return "\n".join(text)

    def __str__(self) -> str:
        return self.table()


def format_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class _Attribution:
    """saved_tensors_hooks + module hooks: bytes saved per module, once per storage."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.seen: set[tuple[str, int]] = set()
        self.params = {_storage_key(p) for p in model.parameters()}
        self.per_module: dict[str, int] = {}
        self.policies: dict[str, dict[str, int]] = {}  # row -> policy -> bytes

    def observe(self, tensor: Tensor, kept: Any) -> None:
        name = self.stack[-1] if self.stack else OUTSIDE_ROW
        for t in kept_tensors(kept):
            key = _storage_key(t)
            nbytes = t.untyped_storage().nbytes()
            if key not in self.params and key not in self.seen and nbytes > 0:
                self.seen.add(key)
                self.per_module[name] = self.per_module.get(name, 0) + nbytes
                self.policies.setdefault(name, {})
                policy = kept_policy(tensor, kept)
                self.policies[name][policy] = self.policies[name].get(policy, 0) + nbytes

    def run(self, fn: Callable[[], Tensor]) -> Tensor:
        def push(module: nn.Module, *_: object) -> None:
            self.stack.append(self.names.get(id(module), type(module).__name__))

        def pop(module: nn.Module, *_: object) -> None:
            self.stack.pop()

        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(push))
            handles.append(module.register_forward_hook(pop, always_call=True))
        try:
            with observing(self.observe):
                return fn()
        finally:
            for h in handles:
                h.remove()


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what the profiler's native library prints on stderr when it starts and stops
    (status lines, not errors of the user's code: none of it runs inside)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocation_peak(prof: torch.profiler.profile) -> int | None:
    """High-water mark of CPU allocations in a profile (private profiler API; None if absent)."""
    try:
        from torch._C._profiler import _EventType

        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                events.append((event.start_time_ns, event.extra_fields.alloc_size))
            stack.extend(event.children)
    except (AttributeError, ImportError, RuntimeError):
        return None
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def rebuilt_optimizer(optimizer: torch.optim.Optimizer, groups: list[dict]) -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class over ``groups`` (param-group dicts carrying their
    settings), with the defaults its constructor accepts (``defaults`` may hold keys that the
    class's ``__init__`` does not take, e.g. AdamW's ``decoupled_weight_decay``)."""
    signature = inspect.signature(type(optimizer).__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    defaults = {k: v for k, v in optimizer.defaults.items() if takes_any or k in signature}
    return type(optimizer)(groups, **defaults)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the optimizer's state tensors; if it has taken no step yet, those of a copy of it
    stepped once on zero gradients (state is created lazily at the first step)."""
    if optimizer is None:
        return 0

    def count(opt: torch.optim.Optimizer) -> int:
        seen, total = set(), 0
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, Tensor) and _storage_key(value) not in seen:
                    seen.add(_storage_key(value))
                    total += value.untyped_storage().nbytes()
        return total

    if optimizer.state:
        return count(optimizer)
    clones = [
        {**group, "params": [p.detach().clone().requires_grad_(p.requires_grad) for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    probe = rebuilt_optimizer(optimizer, clones)
    for group in probe.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    probe.step()
    return count(probe)


def _one_step(model: nn.Module, inputs: object, targets: object, loss_fn: Callable | None, device: torch.device):
    """Forward + loss + backward with attribution and peak; gradients are left as they were."""
    saved_grads = {p: p.grad for p in model.parameters()}
    attribution = _Attribution(model)

    def forward() -> Tensor:
        out = call_model(model, inputs)
        attribution.stack.append(LOSS_ROW)
        try:
            return probe_loss(out, targets, loss_fn)
        finally:
            attribution.stack.pop()

    for p in model.parameters():
        p.grad = None

    def step() -> None:
        attribution.run(forward).backward()

    peak, source = _peak_of(step, device)
    for p, grad in saved_grads.items():
        p.grad = grad
    return attribution.per_module, attribution.policies, peak, source


def _peak_of(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """The allocator's high-water mark while ``fn`` runs, above what was allocated before,
    and where the figure comes from (CUDA allocator; CPU profiler allocation events)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline, "cuda allocator"
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_native_stderr():
            prof.__exit__(None, None, None)
    peak = _cpu_allocation_peak(prof)
    return peak, "cpu profiler allocation events" if peak is not None else "unavailable on cpu (only saved bytes)"


def _forward_peak(model: nn.Module, inputs: object, device: torch.device) -> int | None:
    """The peak of the same forward without gradients: what the step would peak at if backward
    kept nothing (frozen layers' activations, each layer's output before the next one)."""

    def forward() -> None:
        with torch.no_grad():
            call_model(model, inputs)

    return _peak_of(forward, device)[0]


def _ran(module: nn.Module) -> bool:
    state = layer_state(module)
    return state is not None and state.last is not None


def _policy(by_policy: dict[str, int], module: nn.Module | None) -> str:
    """The policies a row's bytes were kept under, largest first; a neighbour module that
    kept nothing says ``nothing``."""
    if by_policy:
        names = [p for p, _ in sorted(by_policy.items(), key=lambda t: -t[1])]
        return "+".join("factors" if p == "weight" else p for p in dict.fromkeys(names))
    state = layer_state(module) if module is not None else None
    return state.last.method if isinstance(state, NeighbourState) and state.last is not None else ""


def measure(
    model: nn.Module,
    inputs: object,
    targets: object = None,
    loss_fn: Callable | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    vanilla: bool = True,
) -> MemoryReport:
    """Run one forward+backward of ``model`` on ``inputs`` and report what it kept.

    ``inputs`` is a tensor, a tuple of positional arguments or a dict of keyword arguments (a
    Hugging Face ``BatchEncoding``: ``measure(model, {"input_ids": ids, "labels": ids})``); the
    loss is ``loss_fn(model(inputs), targets)`` (``loss_fn(output)`` without targets; without a
    loss_fn the output's ``.loss``, else the mean square of the output or of its first tensor:
    :func:`~actcomp.core.batch.probe_loss`). Saved bytes are counted per storage and attributed per
    module; the sum over rows equals ``saved_bytes``. With ``vanilla=True`` the same step is
    run again with compression suspended (:func:`actcomp.suspended`; settings and carried state unchanged), so every
    row has a plain-autograd figure. The model's parameters and gradients are left as they were
    (BatchNorm running statistics are updated by the forward passes, as in training).
    """
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    kinds = {name: "compressed" for name in compressed_layers(model)}
    kinds.update({name: "neighbour" for name, m in model.named_modules() if isinstance(layer_state(m), NeighbourState)})
    modules = dict(model.named_modules())
    per_module, policies, peak, source = _one_step(model, inputs, targets, loss_fn, device)
    forward_peak = _forward_peak(model, inputs, device) if peak is not None else None
    vanilla_per_module, vanilla_peak = None, None
    if vanilla:
        with suspended(model):  # plain autograd; settings, stats and asi's subspaces stay as they are
            vanilla_per_module, _, vanilla_peak, _ = _one_step(model, inputs, targets, loss_fn, device)
    rows = []
    names = list(dict.fromkeys([*per_module, *(vanilla_per_module or {}), *(n for n, k in kinds.items() if k == "neighbour" and _ran(modules[n]))]))
    order = {n: i for i, n in enumerate(modules)}
    for name in sorted(names, key=lambda n: order.get(n, len(order))):
        module = modules.get(name)
        rows.append(
            ModuleMemory(
                name=name,
                layer_type=base_type(module).__name__ if module is not None else "-",
                kind=kinds.get(name, "plain" if module is not None else "other"),
                saved_bytes=per_module.get(name, 0),
                vanilla_saved_bytes=vanilla_per_module.get(name, 0) if vanilla_per_module is not None else None,
                policy=_policy(policies.get(name, {}), module),
            )
        )
    by_policy: dict[str, int] = {}
    for row_policies in policies.values():
        for policy, nbytes in row_policies.items():
            name = "factors" if policy == "weight" else policy
            by_policy[name] = by_policy.get(name, 0) + nbytes
    notes = []
    if device.type == "cpu" and peak is not None:
        notes.append("cpu peak from profiler allocation events: includes every temporary of forward+backward")
    if peak is not None and forward_peak is not None and peak <= 1.1 * forward_peak:
        notes.append(
            f"the peak is set by the forward, not by what backward keeps: a forward without gradients already "
            f"peaks at {format_bytes(forward_peak)} (activations of layers that are not trained, each layer's output "
            "before the next consumes it); compressing more layers will not lower it, a smaller batch or input will"
        )
    return MemoryReport(
        device=str(device),
        rows=rows,
        saved_bytes=sum(per_module.values()),
        peak_bytes=peak,
        peak_source=source,
        weights_bytes=sum(p.numel() * p.element_size() for p in params),
        grads_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        optimizer_state_bytes=_optimizer_state_bytes(optimizer),
        vanilla_saved_bytes=sum(vanilla_per_module.values()) if vanilla_per_module is not None else None,
        vanilla_peak_bytes=vanilla_peak,
        forward_peak_bytes=forward_peak,
        notes=notes,
        buffers_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        batch_bytes=batch_bytes(inputs) + batch_bytes(targets),
        saved_by_policy=by_policy,
    )
