"""export_bundle(): everything a device needs to fine-tune without PyTorch.

The directory holds step.onnx (the training step), model.onnx (inference), state.npz (initial
weights, buffers and subspaces), data.npz (training samples, when given), manifest.json (how
the step's inputs and outputs map to the state, shapes, settings, the step's static memory
plan and, given a device, the verdict) and runner.py (onnxruntime + numpy only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from actcomp.export.inference import onnx_inference
from actcomp.export.memory import graph_memory_plan
from actcomp.export.step import training_step


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
    """Write the bundle for fine-tuning ``model``'s trainable Linear layers; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y = example_batch
    step = training_step(model, example_batch, out / "step.onnx", max_rank=max_rank, eps=eps, momentum=momentum, lr=lr)
    inference = onnx_inference(model, x[:1], out / "model.onnx")
    np.savez(out / "state.npz", **step.initial_state)
    if data is not None:
        np.savez(out / "data.npz", x=data[0].detach().numpy(), y=data[1].detach().numpy())
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
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.copy(Path(__file__).with_name("runner.py"), out / "runner.py")
    return manifest
