"""training_step(): one ONNX graph for a whole fine-tuning step with compressed activations.

Graph inputs: the trainable weights, the momentum buffers (momentum > 0), the tracked subspaces
(one per trainable Linear layer, three per trainable Conv2d: channels, height, width), a batch
(x, y) and the learning rate. Outputs: the new weights, new buffers, new subspaces and the
loss. Inside: the forward (frozen layers as initializers, BatchNorm frozen on its running
statistics, dropout off), a cross-entropy written out explicitly, the backward, the SGD update.

Compression must be static for a graph. Every subspace has a fixed rank (``max_rank``, capped by
the mode's size), comes from one step of subspace iteration warm-started at the tracked
subspace (V <- orth(X_(n) X_(n)^T V_prev), Gram-Schmidt applied twice and unrolled over the
columns, in float64: only MatMul, ReduceSum, Sqrt and Div), and its columns beyond the eps rank
are masked to zero in-graph (cumulative energy against eps ||X||^2). A trainable Linear keeps
L = X V and V of its input rows: dW = (dY^T L) V^T. A trainable Conv2d keeps a Tucker core and
four factors (the batch mode from two iterations at a fixed start every step, never carried)
and computes dW from them as the conv kernel's "expand" route, with convolutions only (stride
and dilation swapped); dX is exact from the weight (conv_transpose2d). Dense and depthwise
convolutions with integer zero padding are supported; anything else trainable raises
ValueError naming the layer.

The step's kernels come from the layer registry: a trainable layer's family
(:func:`actcomp.kernels.registration_for`) must carry :class:`actcomp.kernels.ExportKernels`
(forward, dX and dW per factor type with exportable ops, and what geometry it supports); the
export keeps the first of its static factor types (rows LowRank, Tucker) that the family's
exported dW takes. A family without them, or without an exported dW for those factor types, is
refused with the layer's name.

The graph is traced with make_fx (which records the custom backward; the backward ops of
frozen pooling layers are decomposed into forward ops) and exported with the torch.export-based
exporter; onnxruntime then runs it on the example batch and every output is compared with the
same step run eagerly in PyTorch.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch._decomp
from torch import Tensor, nn

from actcomp.export.verify import check_against_eager, strip_metadata
from actcomp.linalg.factors import LowRank, Tucker, mode_product
from actcomp.attach.swap import restore
from actcomp.kernels.base import ExportKernels, LayerFamily, base_type, module_params, registered_families, registration_for


def subspace_step(x: Tensor, previous: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """One warm-started subspace-iteration step on the rows of x (N x C), static rank K.

    Returns the new orthonormal basis V (C x K), carried to the next step, and V with the
    columns beyond the eps rank set to zero (the kept energy of the first k columns is the
    smallest reaching eps ||x||^2). Gram-Schmidt is applied twice per column, unrolled, in
    float64: the iterated columns are nearly parallel, and in float32 the directions after the
    first few would be set by rounding and differ between runtimes.
    """
    dtype = x.dtype
    x = x.double()  # the iterated columns are nearly parallel: float32 would leave the tail to rounding
    previous = previous.double()
    z = x.T @ (x @ previous)
    floor = 1e-5 * torch.sqrt((z * z).sum(0).max())
    columns: list[Tensor] = []

    def orthogonalised(c: Tensor) -> tuple[Tensor, Tensor]:
        for _ in range(2):
            for q in columns:
                c = c - q * (q @ c)
        norm = torch.sqrt((c * c).sum())
        return c / (norm + 1e-300), norm

    for k in range(z.shape[1]):
        iterated, norm = orthogonalised(z[:, k])
        kept, _ = orthogonalised(previous[:, k])
        # A direction x barely reaches (rank of x below K, or an eigenvalue under 1e-5 of the
        # top one) iterates to rounding noise, which differs between runtimes: carry the
        # previous direction instead, so that every runtime returns the same basis.
        columns.append(torch.where(norm > floor, iterated, kept))
    basis = torch.stack(columns, 1)
    energy = ((x @ basis) ** 2).sum(0)
    before = torch.cumsum(energy, 0) - energy
    mask = (before < eps * (x * x).sum()).to(basis.dtype)
    return basis.to(dtype), (basis * mask).to(dtype)


def _mode_rows(x: Tensor, mode: int) -> Tensor:
    """The transposed mode-n unfolding X_(n)^T (rest x I_n): its rows are the mode's fibres."""
    return x.movedim(mode, -1).reshape(-1, x.shape[mode])


class _RowSubspace:
    """The export's static LowRank of a layer's input rows X_rows (N x C) ~ (X V) V^T: the
    basis V (C x K) of the features is carried between steps, one warm-started subspace
    iteration step per step, columns beyond the eps rank masked."""

    factor_type = LowRank
    needs_batch_start = False

    @staticmethod
    def carried(input_shape: tuple[int, ...]) -> list[tuple[str, int]]:
        """(name suffix, size) of each carried subspace: the features."""
        return [("", input_shape[-1])]

    @staticmethod
    def factors(x: Tensor, parts: tuple[Tensor, ...]) -> LowRank:
        (basis,) = parts
        return LowRank(x @ basis, basis.T)

    @staticmethod
    def run(inp: Tensor, previous: list[Tensor], batch_start: Tensor | None, eps: float, new_bases: list[Tensor], apply: Callable[..., Tensor]) -> Tensor:
        rows = inp.reshape(-1, inp.shape[-1])
        basis, masked = subspace_step(rows.detach(), previous[0], eps)
        new_bases.append(basis)
        out = apply(rows, masked)
        return out.reshape(*inp.shape[:-1], out.shape[-1])


class _TuckerSubspaces:
    """The export's static Tucker of a layer's input (B, C, H, W): the channel and spatial
    subspaces are carried between steps, the batch mode's is never carried (two iterations from
    a fixed start every step); core = X x_n U_n^T."""

    factor_type = Tucker
    needs_batch_start = True

    @staticmethod
    def carried(input_shape: tuple[int, ...]) -> list[tuple[str, int]]:
        """(name suffix, size) of each carried subspace: ``.c``, ``.h``, ``.w`` for (B, C, H, W)."""
        sizes = input_shape[1:]
        labels = ("c", "h", "w") if len(sizes) == 3 else tuple(f"mode{m}" for m in range(1, len(input_shape)))
        return [(f".{label}", size) for label, size in zip(labels, sizes)]

    @staticmethod
    def factors(x: Tensor, parts: tuple[Tensor, ...]) -> Tucker:
        core = x
        for mode, u in enumerate(parts):
            core = mode_product(core, u.T, mode)
        return Tucker(core, tuple(parts))

    @staticmethod
    def run(inp: Tensor, previous: list[Tensor], batch_start: Tensor | None, eps: float, new_bases: list[Tensor], apply: Callable[..., Tensor]) -> Tensor:
        assert batch_start is not None
        data = inp.detach()
        batch, _ = subspace_step(_mode_rows(data, 0), batch_start, eps)
        _, u_b = subspace_step(_mode_rows(data, 0), batch, eps)  # two steps: never carried
        factors = []
        for mode, start in zip(range(1, data.ndim), previous):
            basis, masked = subspace_step(_mode_rows(data, mode), start, eps)
            new_bases.append(basis)
            factors.append(masked)
        return apply(inp, u_b, *factors)


# The factor types the export can keep with static ranks, each with how it computes them; a
# family names in ``export.weight_grads`` which of them its exported dW takes.
_STATIC_FACTORS: tuple[type, ...] = (_RowSubspace, _TuckerSubspaces)


@dataclass(frozen=True, eq=False)
class _ExportCall:
    """The non-tensor arguments of one exported layer call."""

    family: LayerFamily
    kernels: ExportKernels
    geometry: Any
    method: Any  # _RowSubspace or _TuckerSubspaces


class _ExportedLayer(torch.autograd.Function):
    """The family's exportable forward, keeping static factors of x (not x) for dW.

    Backward, all with exportable ops: dX and dW from the family's export kernels
    (:class:`actcomp.kernels.ExportKernels`: the runtime kernel's math, e.g. the conv kernel's
    convolution-only route, tested equal to the runtime's), db the family's.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, call: _ExportCall, *parts: Tensor) -> Tensor:  # type: ignore[override]
        return call.kernels.forward(x, weight, bias, call.geometry)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, weight, bias, call, *parts = inputs
        factors = call.method.factors(x, tuple(parts))
        ctx.call, ctx.input_shape, ctx.has_bias, ctx.parts = call, x.shape, bias is not None, len(parts)
        ctx.save_for_backward(weight, *factors.tensors())

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        weight, *saved = ctx.saved_tensors
        call: _ExportCall = ctx.call
        factor_type = call.method.factor_type
        factors = factor_type.from_tensors(tuple(saved))
        grad_x = call.kernels.input_grad(grad_out, weight, ctx.input_shape, call.geometry)
        grad_w = call.kernels.weight_grads[factor_type](factors, grad_out, weight.shape, call.geometry)
        grad_b = call.family.bias_grad(grad_out) if ctx.has_bias else None
        return (grad_x, grad_w, grad_b, None, *([None] * ctx.parts))


@dataclass(frozen=True)
class _TrainableLayer:
    """A trainable layer of the step and how the export runs it."""

    name: str
    module: nn.Module
    call: _ExportCall


def _export_layers() -> str:
    return " and ".join(sorted({f.export.layers for f in registered_families() if f.export is not None}))


def _refuse(name: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"layer '{name}' ({base_type(module).__name__}) is trainable; the training-step export {why}: "
        "freeze it (requires_grad_(False))"
    )


def _export_call(name: str, module: nn.Module) -> _ExportCall:
    """How the export runs a trainable layer, from the registry: its family's export kernels
    and the first static factor type their dW takes; ValueError naming the layer otherwise."""
    registration = registration_for(base_type(module))
    family = registration.family if registration is not None else None
    if family is None or family.export is None or registration.params is not module_params:
        raise _refuse(name, module, f"supports trainable {_export_layers()} layers only")
    geometry = family.geometry(module)
    why = family.export.unsupported(geometry, module.weight.shape)
    if why is not None:
        raise _refuse(name, module, f"supports {why}")
    method = next((m for m in _STATIC_FACTORS if m.factor_type in family.export.weight_grads), None)
    if method is None:
        kept = ", ".join(m.factor_type.__name__ for m in _STATIC_FACTORS)
        raise _refuse(name, module, f"keeps {kept} factors, for which the {family.name} family has no exportable weight gradient")
    return _ExportCall(family, family.export, geometry, method)


def _trainable_layers(model: nn.Module) -> list[_TrainableLayer]:
    layers = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        layers.append(_TrainableLayer(name, module, _export_call(name, module)))
    if not layers:
        raise ValueError("the model has no trainable parameter: unfreeze the Linear or Conv2d layers to fine-tune")
    return layers


@dataclass
class StepExport:
    """The exported step: file, size, the graph's inputs and outputs in order, initial state
    (numpy arrays by input name) and how far onnxruntime was from eager PyTorch."""

    path: str
    size_bytes: int
    inputs: list[str]
    outputs: list[str]
    initial_state: dict[str, np.ndarray]
    max_abs_error: float
    tolerance: float
    eps: float
    max_rank: int
    momentum: float
    notes: list[str] = field(default_factory=list)


class _StepBuilder:
    """The step as a function of flat tensors, usable eagerly and under make_fx.

    Tracked subspaces: one per trainable Linear (its input features), three per trainable
    Conv2d (channels, height, width); the batch mode is never carried: two subspace-iteration
    steps from a fixed start every step.
    """

    def __init__(self, model: nn.Module, max_rank: int, eps: float, momentum: float, example_x: Tensor) -> None:
        self.model = restore(copy.deepcopy(model)).eval()
        self.layers = _trainable_layers(self.model)
        self.params = [
            (f"{layer.name}.{k}", p) for layer in self.layers for k, p in layer.module.named_parameters(recurse=False) if p.requires_grad
        ]
        self.model.requires_grad_(False)
        self.eps, self.momentum = eps, momentum
        self.basis_names: list[str] = []
        self.bases: list[Tensor] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        generator = torch.Generator().manual_seed(0)
        handles = [
            layer.module.register_forward_pre_hook(lambda mod, a, n=layer.name: self.shapes.__setitem__(n, tuple(a[0].shape)))
            for layer in self.layers
        ]
        try:
            with torch.no_grad():
                self.model(example_x)  # each trainable layer's input shape: static in the graph
        finally:
            for h in handles:
                h.remove()

        def start(size: int, dtype: torch.dtype) -> Tensor:
            return torch.linalg.qr(torch.randn(size, min(max_rank, size), generator=generator, dtype=dtype)).Q

        for layer in self.layers:
            for suffix, size in layer.call.method.carried(self.shapes[layer.name]):
                self.basis_names.append(f"basis.{layer.name}{suffix}")
                self.bases.append(start(size, layer.module.weight.dtype))
        self.batch_start = {
            layer.name: start(self.shapes[layer.name][0], layer.module.weight.dtype)
            for layer in self.layers
            if layer.call.method.needs_batch_start
        }

    def names(self) -> tuple[list[str], list[str]]:
        weights = [n for n, _ in self.params]
        buffers = [f"momentum.{n}" for n in weights] if self.momentum else []
        inputs = [*weights, *buffers, *self.basis_names, "x", "y", "lr"]
        outputs = [f"new.{n}" for n in [*weights, *buffers, *self.basis_names]] + ["loss"]
        return inputs, outputs

    def initial(self) -> list[Tensor]:
        weights = [p.detach().clone() for _, p in self.params]
        buffers = [torch.zeros_like(w) for w in weights] if self.momentum else []
        return [*weights, *buffers, *[b.clone() for b in self.bases]]

    def __call__(self, *flat: Tensor) -> tuple[Tensor, ...]:
        n_params, n_bases = len(self.params), len(self.bases)
        weights = [w.detach().requires_grad_() for w in flat[:n_params]]
        offset = n_params * (2 if self.momentum else 1)
        buffers = list(flat[n_params:offset])
        bases = list(flat[offset : offset + n_bases])
        x, y, lr = flat[offset + n_bases :]
        by_name = {n: w for (n, _), w in zip(self.params, weights)}
        new_bases: list[Tensor] = []
        cursor = 0
        for layer in self.layers:
            count = len(layer.call.method.carried(self.shapes[layer.name]))
            layer.module.forward = self._forward(layer, by_name, bases[cursor : cursor + count], new_bases)  # type: ignore[method-assign]
            cursor += count
        try:
            out = self.model(x)
        finally:
            for layer in self.layers:
                del layer.module.forward
        log_probs = torch.log_softmax(out, 1)
        one_hot = (y[:, None] == torch.arange(out.shape[1], device=out.device)[None]).to(out.dtype)
        loss = -(log_probs * one_hot).sum() / out.shape[0]
        grads = torch.autograd.grad(loss, weights)
        if self.momentum:
            buffers = [self.momentum * m + g for m, g in zip(buffers, grads)]
            steps = buffers
        else:
            steps = list(grads)
        new_weights = [(w - lr * s).detach() for w, s in zip(weights, steps)]
        return (*new_weights, *[b.detach() for b in buffers], *new_bases, loss.detach())

    def _forward(self, layer: _TrainableLayer, by_name: dict[str, Tensor], previous: list[Tensor], new_bases: list[Tensor]):
        """The layer's forward inside the step: static factors of its input by its method, the
        family's exportable kernels through :class:`_ExportedLayer`."""
        weight = by_name.get(f"{layer.name}.weight", layer.module.weight)
        bias = by_name.get(f"{layer.name}.bias", layer.module.bias)

        def apply(inp: Tensor, *parts: Tensor) -> Tensor:
            return _ExportedLayer.apply(inp, weight, bias, layer.call, *parts)

        def forward(inp: Tensor) -> Tensor:
            method = layer.call.method
            return method.run(inp, previous, self.batch_start.get(layer.name), self.eps, new_bases, apply)

        return forward


def _avg_pool2d_backward(grad_output, inp, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """Non-overlapping average pooling (stride = kernel, no padding): spread each gradient over
    its window; other configurations keep the op (and fail to export with its name)."""
    kh, kw = kernel_size if len(kernel_size) == 2 else (kernel_size[0],) * 2
    sh, sw = (stride if len(stride) == 2 else (stride[0],) * 2) if stride else (kh, kw)
    if (sh, sw) != (kh, kw) or any(padding) or ceil_mode or divisor_override is not None:
        return NotImplemented
    spread = grad_output.repeat_interleave(kh, 2).repeat_interleave(kw, 3) / (kh * kw)
    height, width = inp.shape[2:]
    return torch.nn.functional.pad(spread, (0, width - spread.shape[3], 0, height - spread.shape[2]))


def _adaptive_avg_pool2d_backward(grad_output, inp):
    """Adaptive average pooling whose windows tile the input (sizes divisible, global pooling)."""
    height, width = inp.shape[2:]
    oh, ow = grad_output.shape[2:]
    if height % oh or width % ow:
        return NotImplemented
    kh, kw = height // oh, width // ow
    return grad_output.repeat_interleave(kh, 2).repeat_interleave(kw, 3) / (kh * kw)


_BACKWARD_DECOMPOSITIONS = {
    **torch._decomp.get_decompositions(
        [
            torch.ops.aten.max_pool2d_with_indices_backward,
            torch.ops.aten.hardtanh_backward,
            torch.ops.aten.threshold_backward,
            torch.ops.aten._log_softmax_backward_data,
            torch.ops.aten.native_batch_norm_backward,
        ]
    ),
    torch.ops.aten.avg_pool2d_backward.default: _avg_pool2d_backward,
    torch.ops.aten._adaptive_avg_pool2d_backward.default: _adaptive_avg_pool2d_backward,
}


def training_step(
    model: nn.Module,
    example_batch: tuple[Tensor, Tensor],
    path: str | Path,
    *,
    max_rank: int = 8,
    eps: float = 0.9,
    momentum: float = 0.0,
    lr: float = 0.05,
    opset: int = 18,
    tolerance: float = 1e-4,
) -> StepExport:
    """Export one SGD step of fine-tuning ``model``'s trainable Linear layers as ONNX.

    The step's graph has static shapes (those of ``example_batch``: inputs x and int64 class
    labels y), opset ``opset`` (>= 17), frozen layers as initializers and metadata stripped.
    onnxruntime runs it once on the example batch from the initial state (tracked bases start
    from a fixed, seeded orthonormal matrix) and every output must match the same step run
    eagerly within ``tolerance`` (absolute, relative above scale 1), else ValueError.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    if opset < 17:
        raise ValueError(f"opset must be at least 17, got {opset}")
    if not 0 < eps <= 1 or max_rank < 1 or not 0 <= momentum < 1:
        raise ValueError(f"need 0 < eps <= 1, max_rank >= 1, 0 <= momentum < 1; got eps={eps}, max_rank={max_rank}, momentum={momentum}")
    x, y = example_batch
    builder = _StepBuilder(model, max_rank, eps, momentum, x)
    inputs, outputs = builder.names()
    args = (*builder.initial(), x.detach(), y.detach().long(), torch.tensor(lr, dtype=x.dtype))
    expected = builder(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Backward ops of frozen modules without an ONNX translation (avg_pool2d_backward, ...)
        # are decomposed into forward ops while tracing.
        traced = make_fx(builder, decomposition_table=_BACKWARD_DECOMPOSITIONS)(*args)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(traced, args, str(path), dynamo=True, opset_version=opset, input_names=inputs, output_names=outputs, verbose=False)
    strip_metadata(path)
    error, bound = check_against_eager(path, args, expected, tolerance, "the eager step")
    state = {name: a.numpy() for name, a in zip(inputs, args[: len(inputs) - 3])}
    return StepExport(
        path=str(path), size_bytes=path.stat().st_size, inputs=inputs, outputs=outputs, initial_state=state,
        max_abs_error=error, tolerance=bound, eps=eps, max_rank=max_rank, momentum=momentum,
    )
