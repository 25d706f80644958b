"""Method comparison: accuracy against activation memory, like the paper's Pareto figure.

On the demo's transfer task (TinyMobileNet pretrained on digits 0-4, fine-tuned on 5-9), the
last N = 1..k layers are fine-tuned with each method from the same pretrained weights: plain
autograd, SVD, HOSVD (at eps) and Gradient Filter with patches R2/R4/R7. Each point is one run:
x = bytes the fine-tuned layers kept for backward in one step (measured), y = test accuracy.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from actcomp.config import CompressionConfig
from actcomp.demo import accuracy, finetune_copy, last_layers, make_task
from actcomp.hooks import stats
from actcomp.methods import method_class

DEFAULT_METHODS = ("none", "svd", "hosvd", "gradient_filter")


@dataclass(frozen=True)
class ComparePoint:
    method: str  # "hosvd", "gradient_filter R4", ...
    layers: int
    layer_bytes: int
    accuracy: float


def variants(methods: tuple[str, ...], eps: float, patches: tuple[int, ...]) -> list[tuple[str, CompressionConfig]]:
    out = []
    for method in methods:
        if "patch" in method_class(method).settings:
            out += [(f"{method} R{r}", CompressionConfig(method, eps, r)) for r in patches]
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
) -> list[ComparePoint]:
    """Fine-tune the last N = 1..max_layers layers with every method variant; one point each."""
    runs = variants(methods, eps, patches)
    task = make_task(pretrain_epochs, batch_size, seed, progress)
    points = []
    for count in range(1, max_layers + 1):
        names = last_layers(task, count)
        for label, config in runs:
            model, _ = finetune_copy(task, names, config, finetune_epochs, batch_size, seed, progress)
            points.append(
                ComparePoint(label, count, sum(s.kept_bytes for s in stats(model).values()), accuracy(model, task.test_x, task.test_y))
            )
    return points


def write_csv(points: list[ComparePoint], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)
    return path
