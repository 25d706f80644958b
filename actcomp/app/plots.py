"""Figures written by the demo and the method comparison (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actcomp.app.compare import ComparePoint
    from actcomp.app.demo import DemoRow


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_demo(rows: list["DemoRow"], path: str | Path) -> Path:
    """Bars per demo run: bytes kept by autograd (the whole step) beside the step's peak
    allocation, and accuracy, as PNG."""
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(10, 3.2 + 0.3 * len(rows)))
    labels = [r.method for r in rows]
    at = list(range(len(rows)))
    left.barh([i + 0.2 for i in at], [r.saved_bytes / 2**20 for r in rows], height=0.4, color="tab:blue", label="kept by autograd")
    left.barh([i - 0.2 for i in at], [(r.peak_bytes or 0) / 2**20 for r in rows], height=0.4, color="tab:gray", label="peak allocation")
    left.set_yticks(at, labels)
    left.set_xlabel("MiB in one training step")
    left.legend(fontsize=8, loc="lower right")
    right.barh(at, [100 * r.accuracy for r in rows], color="tab:green")
    right.set_xlabel("test accuracy on digits 5-9 (%)")
    right.set_yticks(at, [""] * len(rows))
    fig.suptitle("actcomp demo: fine-tuning a TinyMobileNet (its last layers, then every layer)")
    fig.tight_layout()
    return _save(fig, path)


def plot_compare(points: list["ComparePoint"], path: str | Path, title: str = "") -> Path:
    """Accuracy vs activation memory (log x), one curve per method, N labelled on each point."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(p.method for p in points):
        curve = sorted((p for p in points if p.method == method), key=lambda p: p.layers)
        xs = [max(p.layer_bytes, 1) / 1024 for p in curve]
        ax.plot(xs, [100 * p.accuracy for p in curve], marker="o", label=method)
        for x, p in zip(xs, curve):
            ax.annotate(str(p.layers), (x, 100 * p.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("activation memory of the fine-tuned layers (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Accuracy vs activation memory (labels: number of layers fine-tuned)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
