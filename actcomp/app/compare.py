"""Method comparison: accuracy against activation memory, like the paper's Pareto figure.

On the demo's transfer task (TinyMobileNet pretrained on digits 0-4, fine-tuned on 5-9), the
last N = 1..k layers are fine-tuned with each method from the same pretrained weights: plain
autograd, SVD, HOSVD (at eps) and Gradient Filter with patches R2/R4/R7. Each point is one run:
x = bytes the fine-tuned layers kept for backward in one step (measured), y = test accuracy.

run_peft_compare puts SVD-parametrised fine-tuning (actcomp.peft: singular values, and
Householder reflections) beside full and last-N fine-tuning: trainable parameters, bytes kept
and accuracy, at equal activation bytes (the same N layers).
"""

from __future__ import annotations

import copy
import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from actcomp.core.config import CompressionConfig
from actcomp.core.files import atomic_write_text
from actcomp.app.demo import Task, accuracy, finetune_copy, last_layers, make_task, train as train_model
from actcomp.attach import compress, select_layers, stats
from actcomp.methods import method_class
from actcomp.peft import svd_adapt

DEFAULT_METHODS = ("none", "svd", "hosvd", "gradient_filter")


@dataclass(frozen=True)
class ComparePoint:
    method: str  # "hosvd", "gradient_filter R4", ...
    layers: int
    layer_bytes: int
    accuracy: float


def variants(methods: tuple[str, ...], eps: float, patches: tuple[int, ...]) -> list[tuple[str, CompressionConfig]]:
    """(label, config) of every run: one per method at ``eps``, one per patch size for a method
    that declares the setting ``patch`` (gradient_filter R2, R4, ...). ValueError for an
    unknown method or a setting that cannot work."""
    out = []
    for method in methods:
        if any(s.name == "patch" for s in method_class(method).own_settings):
            out += [(f"{method} R{r}", CompressionConfig(method, eps, patch=r)) for r in patches]
        else:
            out.append((method, CompressionConfig(method, eps)))
    return out


def run_compare(
    methods: tuple[str, ...] = DEFAULT_METHODS,
    max_layers: int = 4,
    eps: float = 0.8,
    patches: tuple[int, ...] = (2, 4, 7),
    pretrain_epochs: int = 6,
    finetune_epochs: int = 6,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> list[ComparePoint]:
    """Fine-tune the last N = 1..max_layers layers with every method variant, on the torch
    ``device`` (default CPU); one point each."""
    runs = variants(methods, eps, patches)
    task = make_task(pretrain_epochs, batch_size, seed, progress, device)
    points = []
    for count in range(1, max_layers + 1):
        names = last_layers(task, count)
        for label, config in runs:
            model, _ = finetune_copy(task, names, config, finetune_epochs, batch_size, seed, progress)
            points.append(
                ComparePoint(label, count, sum(s.kept_bytes for s in stats(model).values()), accuracy(model, task.test_x, task.test_y))
            )
    return points


def write_csv(points: Sequence[Any], path: str | Path) -> Path:
    """Rows of dataclass records (ComparePoint, PeftPoint, OptimizerPoint ...) as CSV, one column
    per field, the header from the first record's fields."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(asdict(points[0])))
    writer.writeheader()
    writer.writerows(asdict(p) for p in points)
    return atomic_write_text(path, table.getvalue())


@dataclass(frozen=True)
class PeftPoint:
    """One fine-tuning run of the SVD-parametrised comparison."""

    method: str  # "full", "last-N", "svd s", "svd s+q r=8", "svd s+q r=8 + hosvd 0.8"
    layers: int  # layers fine-tuned (the last N; all of them for "full")
    trainable_params: int
    layer_bytes: int  # what the fine-tuned layers kept for backward in one step (measured)
    accuracy: float


def peft_variants(reflections: int, eps: float) -> list[tuple[str, str | None, CompressionConfig]]:
    """(label, train mode or None for plain fine-tuning, compression of the fine-tuned layers)."""
    return [
        ("last-N", None, CompressionConfig("none")),
        ("svd s", "s", CompressionConfig("none")),
        (f"svd s+q r={reflections}", "s+q", CompressionConfig("none")),
        (f"svd s+q r={reflections} + hosvd {eps:g}", "s+q", CompressionConfig("hosvd", eps)),
    ]


def peft_copy(task: Task, names: list[str], train: str | None, reflections: int, config: CompressionConfig, lr: float, epochs: int, batch_size: int, seed: int, progress: bool) -> torch.nn.Module:
    """A copy of the pretrained model whose layers ``names`` are fine-tuned: plainly (``train``
    None) or SVD-parametrised with ``train`` ("s" or "s+q"), compressed as ``config`` says.

    The classifier is new (make_task re-initialises it for the new classes), so it has no
    pretrained spectrum worth keeping: when selected it is trained plainly in every run, and
    only the other selected layers are SVD-parametrised. Biases of selected layers train."""
    model = copy.deepcopy(task.base)
    model.requires_grad_(False)
    adapt = [n for n in names if n != "classifier"] if train is not None else []
    if adapt:
        generator = torch.Generator().manual_seed(seed)
        svd_adapt(model, adapt, reflections=reflections if train == "s+q" else 0, train=train, generator=generator)
    for name in names:
        module = model.get_submodule(name)
        if name not in adapt:
            module.requires_grad_(True)
        elif module.bias is not None:
            module.bias.requires_grad_(True)
    compress(model, names, config=config)
    label = "plain" if train is None else f"svd {train}"
    train_model(model, task.train_x, task.train_y, epochs, batch_size, lr, seed, f"fine-tune 5-9 ({label})", progress)
    return model


def run_peft_compare(
    max_layers: int = 4,
    reflections: int = 8,
    eps: float = 0.8,
    lr: float = 3e-3,
    pretrain_epochs: int = 6,
    finetune_epochs: int = 6,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> list[PeftPoint]:
    """SVD-parametrised fine-tuning (actcomp.peft) against full and last-N fine-tuning.

    On the demo's task, for N = 1..max_layers the last N layers are fine-tuned plainly, with
    only singular values ("svd s"), with singular values and ``reflections`` Householder
    vectors ("svd s+q"), and the latter with hosvd at ``eps`` on the same layers; plus full
    fine-tuning of every Conv/Linear layer. Plain and SVD runs of the same N keep the same
    activations (the layers' inputs), so they compare at equal activation bytes. Each point:
    trainable parameters, bytes the fine-tuned layers kept (actcomp.stats), test accuracy."""
    task = make_task(pretrain_epochs, batch_size, seed, progress)
    points = []

    def point(label: str, count: int, model) -> PeftPoint:
        return PeftPoint(
            label, count, sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(s.kept_bytes for s in stats(model).values()), accuracy(model, task.test_x, task.test_y),
        )

    everything = select_layers(task.base, "all")
    full = peft_copy(task, everything, None, reflections, CompressionConfig("none"), lr, finetune_epochs, batch_size, seed, progress)
    points.append(point("full", len(everything), full))
    for count in range(1, max_layers + 1):
        names = last_layers(task, count)
        for label, train, config in peft_variants(reflections, eps):
            if train is not None and names == ["classifier"]:
                continue  # nothing to SVD-parametrise: the run would repeat last-N
            model = peft_copy(task, names, train, reflections, config, lr, finetune_epochs, batch_size, seed, progress)
            points.append(point(label, count, model))
    return points


def format_peft_table(points: list[PeftPoint]) -> str:
    """The points as an aligned text table."""
    from actcomp.memory import format_bytes
    from actcomp.memory.format import aligned_table

    header = ("method", "layers", "trainable params", "kept by layers", "accuracy")
    rows = [(p.method, str(p.layers), str(p.trainable_params), format_bytes(p.layer_bytes), f"{100 * p.accuracy:.1f}%") for p in points]
    return aligned_table(header, rows)
