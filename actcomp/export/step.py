"""training_step(): one ONNX graph for a whole fine-tuning step with compressed activations.

Graph inputs: the trainable weights, the momentum buffers (momentum > 0), one tracked subspace
per trainable Linear layer, a batch (x, y) and the learning rate. Outputs: the new weights,
new buffers, new subspaces and the loss. Inside: the forward (frozen layers as initializers,
BatchNorm frozen on its running statistics, dropout off), a cross-entropy written out
explicitly, the backward, and the SGD update.

Compression must be static for a graph: each trainable Linear keeps a rank-``max_rank``
factorisation of its input rows X (N x C), X ~ (X V) V^T, where V comes from one step of
subspace iteration warm-started at the tracked subspace (V <- orth(X^T X V_prev), Gram-Schmidt
applied twice and unrolled over the columns: only MatMul, ReduceSum, Sqrt and Div) and the
columns beyond the eps rank are masked to zero in-graph (cumulative energy against
eps ||X||^2). The layer keeps L = X V_m and V_m; dW = (dY^T L) V_m^T, dX = dY W exactly.

The graph is traced with make_fx (which records the custom backward) and exported with the
torch.export-based exporter; onnxruntime then runs it on the example batch and every output is
compared with the same step run eagerly in PyTorch. Trainable layers must be Linear for now;
anything else trainable raises ValueError naming the layer.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from actcomp.hooks.swap import restore
from actcomp.kernels import base_type


class _LowRankLinear(torch.autograd.Function):
    """x W^T + b that keeps L = x V and V (static rank) for dW = (dY^T L) V^T."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, basis: Tensor) -> Tensor:
        out = x @ weight.T
        return out + bias if bias is not None else out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, weight, bias, basis = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, x @ basis, basis)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        weight, left, basis = ctx.saved_tensors
        grad_b = grad_out.sum(0) if ctx.has_bias else None
        return grad_out @ weight, (grad_out.T @ left) @ basis.T, grad_b, None


def subspace_step(x: Tensor, previous: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """One warm-started subspace-iteration step on the rows of x (N x C), static rank K.

    Returns the new orthonormal basis V (C x K), carried to the next step, and V with the
    columns beyond the eps rank set to zero (the kept energy of the first k columns is the
    smallest reaching eps ||x||^2). Gram-Schmidt is applied twice per column, unrolled.
    """
    z = x.T @ (x @ previous)
    columns: list[Tensor] = []
    for k in range(z.shape[1]):
        c = z[:, k]
        for _ in range(2):
            for q in columns:
                c = c - q * (q @ c)
        columns.append(c / torch.sqrt((c * c).sum() + 1e-30))
    basis = torch.stack(columns, 1)
    energy = ((x @ basis) ** 2).sum(0)
    before = torch.cumsum(energy, 0) - energy
    mask = (before < eps * (x * x).sum()).to(x.dtype)
    return basis, basis * mask


def _trainable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    layers = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if base_type(module) is not nn.Linear:
            raise ValueError(
                f"layer '{name}' ({base_type(module).__name__}) is trainable; the training-step export "
                "supports trainable Linear layers only: freeze it (requires_grad_(False))"
            )
        layers.append((name, module))
    if not layers:
        raise ValueError("the model has no trainable parameter: unfreeze the Linear layers to fine-tune")
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
    """The step as a function of flat tensors, usable eagerly and under make_fx."""

    def __init__(self, model: nn.Module, max_rank: int, eps: float, momentum: float) -> None:
        self.model = restore(copy.deepcopy(model)).eval()
        self.layers = _trainable_linears(self.model)
        self.params = [(f"{n}.{k}", p) for n, m in self.layers for k, p in m.named_parameters(recurse=False) if p.requires_grad]
        self.model.requires_grad_(False)
        self.eps, self.momentum = eps, momentum
        generator = torch.Generator().manual_seed(0)
        self.bases = [
            torch.linalg.qr(torch.randn(m.in_features, min(max_rank, m.in_features), generator=generator, dtype=m.weight.dtype)).Q
            for _, m in self.layers
        ]

    def names(self) -> tuple[list[str], list[str]]:
        weights = [n for n, _ in self.params]
        buffers = [f"momentum.{n}" for n in weights] if self.momentum else []
        bases = [f"basis.{n}" for n, _ in self.layers]
        inputs = [*weights, *buffers, *bases, "x", "y", "lr"]
        outputs = [f"new.{n}" for n in [*weights, *buffers, *bases]] + ["loss"]
        return inputs, outputs

    def initial(self) -> list[Tensor]:
        weights = [p.detach().clone() for _, p in self.params]
        buffers = [torch.zeros_like(w) for w in weights] if self.momentum else []
        return [*weights, *buffers, *[b.clone() for b in self.bases]]

    def __call__(self, *flat: Tensor) -> tuple[Tensor, ...]:
        n_params, n_layers = len(self.params), len(self.layers)
        weights = [w.detach().requires_grad_() for w in flat[:n_params]]
        offset = n_params * (2 if self.momentum else 1)
        buffers = list(flat[n_params:offset])
        bases = list(flat[offset : offset + n_layers])
        x, y, lr = flat[offset + n_layers :]
        by_name = {n: w for (n, _), w in zip(self.params, weights)}
        new_bases: list[Tensor] = []
        for index, (name, module) in enumerate(self.layers):
            module.forward = self._forward(name, module, by_name, bases[index], new_bases)  # type: ignore[method-assign]
        try:
            out = self.model(x)
        finally:
            for _, module in self.layers:
                del module.forward
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

    def _forward(self, name: str, module: nn.Linear, by_name: dict[str, Tensor], previous: Tensor, new_bases: list[Tensor]):
        def forward(inp: Tensor) -> Tensor:
            rows = inp.reshape(-1, inp.shape[-1])
            basis, masked = subspace_step(rows.detach(), previous, self.eps)
            new_bases.append(basis)
            weight = by_name.get(f"{name}.weight", module.weight)
            bias = by_name.get(f"{name}.bias", module.bias)
            out = _LowRankLinear.apply(rows, weight, bias, masked)
            return out.reshape(*inp.shape[:-1], out.shape[-1])

        return forward


def _strip_metadata(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    model.producer_name = model.producer_version = model.doc_string = ""
    del model.metadata_props[:]
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        value.doc_string = ""
        del value.metadata_props[:]
    onnx.save(model, str(path))


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
    import onnxruntime as ort
    from torch.fx.experimental.proxy_tensor import make_fx

    if opset < 17:
        raise ValueError(f"opset must be at least 17, got {opset}")
    if not 0 < eps <= 1 or max_rank < 1 or not 0 <= momentum < 1:
        raise ValueError(f"need 0 < eps <= 1, max_rank >= 1, 0 <= momentum < 1; got eps={eps}, max_rank={max_rank}, momentum={momentum}")
    x, y = example_batch
    builder = _StepBuilder(model, max_rank, eps, momentum)
    inputs, outputs = builder.names()
    args = (*builder.initial(), x.detach(), y.detach().long(), torch.tensor(lr, dtype=x.dtype))
    expected = builder(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = make_fx(builder)(*args)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(traced, args, str(path), dynamo=True, opset_version=opset, input_names=inputs, output_names=outputs, verbose=False)
    _strip_metadata(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    results = session.run(None, feeds)
    error = max(float(np.abs(r - e.numpy()).max()) for r, e in zip(results, expected))
    scale = max(1.0, max(float(e.abs().max()) for e in expected))
    if error > tolerance * scale:
        path.unlink()
        raise ValueError(f"onnxruntime differs from the eager step by {error:.3g} (tolerance {tolerance * scale:.3g}); not exported")
    state = {name: a.numpy() for name, a in zip(inputs, args[: len(inputs) - 3])}
    return StepExport(
        path=str(path), size_bytes=path.stat().st_size, inputs=inputs, outputs=outputs, initial_state=state,
        max_abs_error=error, tolerance=tolerance * scale, eps=eps, max_rank=max_rank, momentum=momentum,
    )
