"""The demo: transfer a small CNN to new classes with compressed activations, offline.

A TinyMobileNet is pretrained on scikit-learn's digits 0-4 (upsampled to 32x32), then its last
N Conv/Linear layers are fine-tuned on digits 5-9 with each method (plain autograd, HOSVD,
SVD) from the same starting point. For each run the table shows the bytes autograd kept for
backward in one training step (measured with saved_tensors_hooks, all layers included), the
bytes kept by the fine-tuned layers alone, test accuracy and the median time per step.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from actcomp.data import digits, split
from actcomp.hooks import compress, select_layers, stats
from actcomp.memory import count_saved
from actcomp.models import TinyMobileNet


@dataclass(frozen=True)
class DemoRow:
    method: str
    layers: int
    eps: float
    saved_bytes: int  # everything autograd kept in one training step
    layer_bytes: int  # what the fine-tuned layers kept (factors, or inputs for 'none')
    accuracy: float
    step_ms: float


def _batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


def _train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, batch_size: int, lr: float, seed: int, desc: str, progress: bool) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    step_ms = []
    model.train()
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc=desc, leave=False, disable=not progress) as bar:
        for _ in range(epochs):
            for xb, yb in _batches(x, y, batch_size, generator):
                start = time.perf_counter()
                optimizer.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                optimizer.step()
                step_ms.append((time.perf_counter() - start) * 1e3)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    return step_ms


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def run_demo(
    layers: int = 4,
    eps: float = 0.8,
    methods: tuple[str, ...] = ("none", "hosvd", "svd"),
    pretrain_epochs: int = 6,
    finetune_epochs: int = 6,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> list[DemoRow]:
    """Pretrain on digits 0-4, fine-tune the last ``layers`` layers on 5-9 with each method.

    Returns one :class:`DemoRow` per method. Everything is seeded: the same arguments give the
    same pretrained model and the same batches for every method.
    """
    torch.manual_seed(seed)
    source_x, source_y = digits(classes=(0, 1, 2, 3, 4))
    target = digits(classes=(5, 6, 7, 8, 9))
    train_x, train_y, test_x, test_y = split(*target, test_fraction=0.3, seed=seed)

    base = TinyMobileNet(num_classes=5)
    _train(base, source_x, source_y, pretrain_epochs, batch_size, 3e-3, seed, "pretrain on digits 0-4", progress)
    base.classifier.reset_parameters()  # a fresh head for the new classes

    names = select_layers(base, f"last:{layers}", sample=train_x[:1])
    rows = []
    for method in methods:
        model = copy.deepcopy(base)
        modules = dict(model.named_modules())
        model.requires_grad_(False)
        for name in names:
            modules[name].requires_grad_(True)
        compress(model, names, method=method, eps=eps)
        step_ms = _train(
            model, train_x, train_y, finetune_epochs, batch_size, 3e-3, seed, f"fine-tune 5-9 ({method})", progress
        )
        model.train()
        with count_saved(model) as saved:
            loss = nn.functional.cross_entropy(model(train_x[:batch_size]), train_y[:batch_size])
        loss.backward()
        model.zero_grad()
        layer_bytes = sum(s.kept_bytes for s in stats(model).values())
        rows.append(
            DemoRow(
                method=method,
                layers=layers,
                eps=eps if method != "none" else 1.0,
                saved_bytes=saved.saved_bytes,
                layer_bytes=layer_bytes,
                accuracy=_accuracy(model, test_x, test_y),
                step_ms=statistics.median(step_ms),
            )
        )
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """The demo's rows as an aligned text table, with bytes relative to the first row."""
    header = ("method", "layers", "eps", "kept by autograd", "kept by layers", "vs plain", "accuracy", "ms/step")
    plain = rows[0].layer_bytes or 1
    lines = [
        (
            r.method,
            str(r.layers),
            f"{r.eps:g}",
            f"{r.saved_bytes / 1024:.1f} KiB",
            f"{r.layer_bytes / 1024:.1f} KiB",
            f"{r.layer_bytes / plain:.3f}",
            f"{100 * r.accuracy:.1f}%",
            f"{r.step_ms:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*line) for line in lines)])


def rows_as_dicts(rows: list[DemoRow]) -> list[dict]:
    return [asdict(r) for r in rows]
