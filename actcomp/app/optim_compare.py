"""Optimizer comparison at equal activation memory: SGD with momentum, Adam, SINGD, HyLo on the
demo's task (the optimizers as :func:`actcomp.optim.factory.make_optimizer` builds them).

The demo's TinyMobileNet, pretrained on digits 0-4, has its last N Conv/Linear layers
fine-tuned on digits 5-9 with the same compression (method, eps) and the same seeded batches,
once per optimizer. Per run: test accuracy, what the fine-tuned layers kept for backward
(``stats``) and what autograd kept in all in one step (``count_saved``) - the same for every
optimizer, since the compression is - and the optimizer's state: its largest size over the
steps, measured just before each ``step()`` (momentum and Adam moments; SINGD's K, C, their
momenta and the H accumulators; HyLo's kept samples, cores and the samples captured for the
next refresh), plus the median step time.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from actcomp.core.config import CompressionConfig
from actcomp.app.models import train_only
from actcomp.attach import compress, stats
from actcomp.memory import count_saved
from actcomp.optim.factory import make_optimizer

# "momentum" is SGD with momentum 0.9 ("sgd" is plain SGD, momentum 0)
OPTIMIZERS = ("momentum", "adam", "singd", "hylo")
# learning rates for the comparison (the default of --lr in finetune is Adam's 3e-3)
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.1, "adam": 0.01, "singd": 0.3, "hylo": 0.1}


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the tensors reachable from obj (dicts, lists, tuples, objects with
    ``named_tensors()`` such as singd's structured matrices), each storage once."""
    if isinstance(obj, Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "named_tensors"):
        return sum(_tensor_bytes(t, seen) for _, t in obj.named_tensors())
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's state: ``state_bytes()`` where it has one (HyLo), else every
    tensor of its ``state_dict()`` (torch optimizers; SINGD with its K, C, momenta, H)."""
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    return _tensor_bytes(optimizer.state_dict(), set())


@dataclass(frozen=True)
class OptimizerPoint:
    optimizer: str
    lr: float
    layers: int
    layer_bytes: int  # what the fine-tuned layers kept for backward in one step
    input_bytes: int  # their full inputs: what plain autograd (and stock SINGD's hook) would keep
    saved_bytes: int  # everything autograd kept in one step
    state_bytes: int  # the optimizer's largest state over the run
    accuracy: float
    step_ms: float


def finetune_with(
    task: Any, names: list[str], config: CompressionConfig, optimizer_name: str, lr: float,
    epochs: int, batch_size: int, seed: int, progress: bool,
) -> tuple[nn.Module, OptimizerPoint]:
    """Fine-tune a copy of the task's model (only ``names`` trained, compressed as ``config``)
    with one optimizer; the point of that run."""
    from actcomp.app.demo import accuracy

    model = train_only(copy.deepcopy(task.base), names)
    compress(model, names, config=config)
    optimizer = make_optimizer(optimizer_name, model, lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    step_ms, peak_state, saved_bytes = [], 0, 0
    model.train()
    steps = epochs * ((len(task.train_y) + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc=f"fine-tune 5-9 ({optimizer_name})", leave=False, disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(task.train_y), generator=generator)
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                xb, yb = task.train_x[index], task.train_y[index]
                begin = time.perf_counter()
                optimizer.zero_grad()
                if not step_ms:  # what autograd keeps, measured on the first step
                    with count_saved(model) as saved:
                        loss = loss_fn(model(xb), yb)
                    saved_bytes = saved.saved_bytes
                else:
                    loss = loss_fn(model(xb), yb)
                loss.backward()
                peak_state = max(peak_state, state_bytes(optimizer))
                optimizer.step()
                step_ms.append((time.perf_counter() - begin) * 1e3)
                bar.update()
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    point = OptimizerPoint(
        optimizer=optimizer_name, lr=lr, layers=len(names), layer_bytes=sum(s.kept_bytes for s in stats(model).values()),
        input_bytes=sum(s.input_bytes for s in stats(model).values()),
        saved_bytes=saved_bytes, state_bytes=peak_state, accuracy=accuracy(model, task.test_x, task.test_y),
        step_ms=statistics.median(step_ms),
    )
    return model, point


def check_optimizer_names(optimizers: tuple[str, ...]) -> None:
    """ValueError for an unknown optimizer, or singd without its package (before any training)."""
    for name in optimizers:
        if name not in DEFAULT_LR:
            raise ValueError(f"unknown optimizer {name!r}; one of {', '.join(DEFAULT_LR)}")
    if "singd" in optimizers:
        try:
            from actcomp.optim import SINGD  # noqa: F401
        except ImportError as error:  # before any training: the command line's one-line error
            raise ValueError(str(error)) from None


def run_optimizer_compare(
    optimizers: tuple[str, ...] = OPTIMIZERS,
    layers: int = 4,
    method: str = "hosvd",
    eps: float = 0.8,
    lrs: dict[str, float] | None = None,
    pretrain_epochs: int = 6,
    finetune_epochs: int = 6,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> list[OptimizerPoint]:
    """One fine-tuning run per optimizer on the demo's task, same layers, compression and
    batches; ``lrs`` overrides :data:`DEFAULT_LR` per optimizer."""
    from actcomp.app.demo import last_layers, make_task

    config = CompressionConfig(method, eps)
    check_optimizer_names(optimizers)
    rates = {**DEFAULT_LR, **(lrs or {})}
    task = make_task(pretrain_epochs, batch_size, seed, progress)
    names = last_layers(task, layers)
    return [
        finetune_with(task, names, config, name, rates[name], finetune_epochs, batch_size, seed, progress)[1]
        for name in optimizers
    ]


def format_points(points: list[OptimizerPoint]) -> str:
    """The comparison as an aligned text table."""
    from actcomp.memory import format_bytes
    from actcomp.memory.format import aligned_table

    header = ("optimizer", "lr", "layers", "layer inputs", "kept by layers", "kept by autograd", "optimizer state", "accuracy", "ms/step")
    rows = [
        (
            p.optimizer, f"{p.lr:g}", str(p.layers), format_bytes(p.input_bytes), format_bytes(p.layer_bytes), format_bytes(p.saved_bytes),
            format_bytes(p.state_bytes), f"{100 * p.accuracy:.1f}%", f"{p.step_ms:.1f}",
        )
        for p in points
    ]
    return aligned_table(header, rows)
