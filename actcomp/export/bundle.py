"""export_bundle(): everything a device needs to fine-tune without PyTorch.

The directory holds step.onnx (the training step), model.onnx (inference), state.npz (the
state the runner continues from: weights, buffers and subspaces), initial_state.npz (the same,
never written by the runner, so the starting point is never lost), data.npz (training samples,
when given), manifest.json (how the step's inputs and outputs map to the state, shapes, number
of classes, the data's scale, settings, the step's static memory plan and, given a device
profile, the verdict) and runner.py (onnxruntime + numpy only).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from actcomp.export.inference import onnx_inference
from actcomp.export.memory import graph_memory_plan
from actcomp.export.step import training_step
from actcomp.core.files import atomic_write, atomic_write_text


def check_step_settings(*, max_rank: int, eps: float, momentum: float, lr: float) -> None:
    """Raise ValueError naming the first setting of the exported step that cannot work:
    ``max_rank >= 1``, ``0 < eps <= 1``, ``0 <= momentum < 1``, ``lr`` positive and finite."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a whole number >= 1, got {max_rank!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps <= 1):
        raise ValueError(f"eps must be a number in (0, 1], got {eps!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")


def check_samples(x: Tensor, y: Tensor, num_classes: int, what: str) -> None:
    """Raise ValueError unless ``x`` is finite with one sample per label of ``y``, and ``y``
    holds integer class labels in ``0..num_classes-1``."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.dim() != 1:
        raise ValueError(f"{what}: y must be a 1-D tensor of integer class labels, got {y.dtype} of shape {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{what}: labels must lie in 0..{num_classes - 1} (the model has {num_classes} outputs), got {int(y.min())}..{int(y.max())}")
    if not bool(torch.isfinite(x.float()).all()):
        raise ValueError(f"{what}: x holds NaN or Inf")


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getbuffer())


def _num_classes(model: nn.Module, x: Tensor) -> int:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(x[:1]).shape[-1])
    finally:
        model.train(training)


def export_bundle(
    model: nn.Module,
    example_batch: tuple[Tensor, Tensor],
    out_dir: str | Path,
    *,
    data: tuple[Tensor, Tensor] | None = None,
    device: str | None = None,
    max_rank: int = 8,
    eps: float = 0.9,
    momentum: float = 0.0,
    lr: float = 0.05,
) -> dict:
    """Write the bundle for fine-tuning ``model``'s trainable layers; returns the manifest.

    ``device`` is a device profile (name or .toml) to check the step's memory plan against.
    The settings, the example batch and ``data`` are checked first (labels in range, one
    label per sample, finite inputs). The manifest records ``num_classes`` and ``x_abs_max``
    (the largest |x| of the data) so that the runner can refuse labels out of range and data on
    another scale (uint8 images in 0..255 for a model trained on 0..1). Every file is written
    atomically.
    """
    check_step_settings(max_rank=max_rank, eps=eps, momentum=momentum, lr=lr)
    x, y = example_batch
    num_classes = _num_classes(model, x)
    check_samples(x, y, num_classes, "the example batch")
    if data is not None:
        check_samples(data[0], data[1], num_classes, "the bundle's data")
        if tuple(data[0].shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"the bundle's data has samples of shape {tuple(data[0].shape[1:])}, the example batch {tuple(x.shape[1:])}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = training_step(model, example_batch, out / "step.onnx", max_rank=max_rank, eps=eps, momentum=momentum, lr=lr)
    inference = onnx_inference(model, x[:1], out / "model.onnx")
    _save_arrays(out / "state.npz", step.initial_state)
    _save_arrays(out / "initial_state.npz", step.initial_state)
    if data is not None:
        _save_arrays(out / "data.npz", {"x": data[0].detach().numpy(), "y": data[1].detach().numpy()})
    scale = (data[0] if data is not None else x).detach().abs().max()
    plan = graph_memory_plan(step.path)
    manifest = {
        "step": "step.onnx",
        "inference": "model.onnx",
        "state_inputs": step.inputs[:-3],
        "inputs": step.inputs,
        "outputs": step.outputs,
        "batch_size": int(x.shape[0]),
        "x_shape": list(x.shape),
        "x_dtype": str(x.detach().numpy().dtype),
        "x_abs_max": float(scale),
        "num_classes": num_classes,
        "lr": lr,
        "eps": eps,
        "max_rank": max_rank,
        "momentum": momentum,
        "step_bytes": step.size_bytes,
        "inference_bytes": inference.size_bytes,
        "verified_max_abs_error": step.max_abs_error,
        "memory_plan": {"peak_bytes": plan.peak_bytes, "weights_bytes": plan.weights_bytes},
    }
    if device is not None:
        verdict = plan.verdict(device, weights_in_flash=True)
        manifest["memory_plan"]["verdict"] = str(verdict)
        manifest["memory_plan"]["fits"] = verdict.fits
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    atomic_write(out / "runner.py", Path(__file__).with_name("runner.py").read_bytes())
    return manifest
