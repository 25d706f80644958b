"""Static memory plan of an ONNX graph: every tensor's lifetime over the node schedule.

The schedule is the graph's node order (ONNX requires it to be topological), less the nodes
that read only weights and constants (a runtime computes those once, at load time: their
outputs are counted with the weights). A tensor is
allocated when its node runs and freed after the last node that reads it; graph inputs live
from the start, graph outputs to the end; initializers (weights) are reported apart. While a
node runs its inputs and outputs are all live, so the peak is

    peak = max over steps i of  sum of bytes of tensors with produced <= i <= last_use,

which is what an allocator needs that never writes an output over an input (onnxruntime's
arena may reuse buffers in place and pad allocations, so its figures differ from this plan by
that reuse and padding). Shapes must be static: they come from ONNX shape inference.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from actcomp.devices import DeviceProfile, load_device
from actcomp.memory.measure import format_bytes


@dataclass(frozen=True)
class TensorLife:
    name: str
    nbytes: int
    produced: int  # index of the node that writes it; -1 for a graph input
    last_use: int  # index of the last node that reads it; the node count for a graph output


@dataclass(frozen=True)
class Verdict:
    """Does the graph fit a device? ``ram_needed`` = peak activations (+ weights unless they
    stay in flash); ``flash_needed`` = weights kept in flash (0 otherwise)."""

    device: str
    fits: bool
    ram_needed: int
    ram_budget: int
    flash_needed: int
    flash_budget: int

    @property
    def margin_bytes(self) -> int:
        return self.ram_budget - self.ram_needed

    def __str__(self) -> str:
        word = "yes" if self.fits else "no"
        text = f"fits {self.device}: {word}, RAM {format_bytes(self.ram_needed)} of {format_bytes(self.ram_budget)} (margin {format_bytes(self.margin_bytes)})"
        if self.flash_needed:
            text += f", flash {format_bytes(self.flash_needed)} of {format_bytes(self.flash_budget)}"
        return text


@dataclass
class GraphMemoryPlan:
    """Lifetimes of every activation tensor of a graph, its peak, and its weights."""

    nodes: list[str]
    tensors: list[TensorLife]
    weights_bytes: int
    peak_bytes: int
    peak_step: int
    folded: list[str] = field(default_factory=list)  # constant-only nodes, outputs counted as weights

    def live_bytes(self, step: int) -> int:
        """Bytes of the tensors live while node ``step`` runs."""
        return sum(t.nbytes for t in self.tensors if t.produced <= step <= t.last_use)

    def verdict(self, device: str | DeviceProfile, weights_in_flash: bool | None = None) -> Verdict:
        """Check against a device profile. By default weights stay in flash on an MCU (an
        inference graph reads them only) and in RAM elsewhere."""
        profile = load_device(device) if isinstance(device, str) else device
        in_flash = profile.kind == "mcu" if weights_in_flash is None else weights_in_flash
        ram = self.peak_bytes + (0 if in_flash else self.weights_bytes)
        flash = self.weights_bytes if in_flash else 0
        fits = ram <= profile.budget_bytes and flash <= profile.flash_bytes
        return Verdict(profile.name, fits, ram, profile.budget_bytes, flash, profile.flash_bytes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def __str__(self) -> str:
        node = self.nodes[self.peak_step] if self.nodes else "-"
        return (
            f"{len(self.nodes)} nodes, {len(self.tensors)} activation tensors; peak {format_bytes(self.peak_bytes)} "
            f"while node {self.peak_step} ({node}) runs; weights {format_bytes(self.weights_bytes)}"
        )


def _nbytes(value_type: Any, name: str) -> int:
    import numpy as np
    from onnx import helper

    tensor = value_type.tensor_type
    dims = []
    for d in tensor.shape.dim:
        if not d.HasField("dim_value"):
            raise ValueError(f"tensor '{name}' has a dynamic shape; the memory plan needs static shapes")
        dims.append(d.dim_value)
    if not tensor.HasField("shape"):
        raise ValueError(f"tensor '{name}' has no inferred shape; the memory plan needs static shapes")
    return int(np.prod(dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize


def graph_memory_plan(model: Any) -> GraphMemoryPlan:
    """The memory plan of an ONNX model (a ``onnx.ModelProto`` or the path of a .onnx file)."""
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = model.graph
    if any(a.type == onnx.AttributeProto.GRAPH for node in graph.node for a in node.attribute):
        raise ValueError("graphs with subgraphs (If, Loop, Scan) are not supported by the memory plan")
    weights = {t.name: t for t in graph.initializer}
    types = {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}
    # Nodes that read only weights and constants (Constant, Identity of an initializer, ...) are
    # computed once when a runtime loads the graph: their outputs count as weights, not steps.
    constants: set[str] = set(weights)
    folded_bytes, schedule, folded = 0, [], []
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(not i or i in constants for i in node.input)):
            constants.update(o for o in node.output if o)
            folded_bytes += sum(_nbytes(types[o], o) for o in node.output if o and o in types)
            folded.append(f"{node.op_type}:{node.name}")
        else:
            schedule.append(node)
    count = len(schedule)
    produced: dict[str, int] = {v.name: -1 for v in graph.input if v.name not in weights}
    last_use: dict[str, int] = dict.fromkeys(produced, -1)
    for step, node in enumerate(schedule):
        for name in node.input:
            if name and name not in constants:
                last_use[name] = step
        for name in node.output:
            if name:
                produced[name] = step
                last_use.setdefault(name, step)
    for v in graph.output:
        last_use[v.name] = count
    tensors = []
    for name, start in produced.items():
        if name not in types:
            raise ValueError(f"tensor '{name}' has no inferred type; the memory plan needs static shapes")
        tensors.append(TensorLife(name, _nbytes(types[name], name), start, max(last_use[name], start)))
    weights_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in weights.values()) + folded_bytes
    plan = GraphMemoryPlan([f"{n.op_type}:{n.name}" for n in schedule], tensors, weights_bytes, 0, 0, folded)
    for step in range(count):
        live = plan.live_bytes(step)
        if live > plan.peak_bytes:
            plan.peak_bytes, plan.peak_step = live, step
    return plan
