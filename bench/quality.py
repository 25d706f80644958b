"""Learning quality at equal memory: test accuracy over seeds against the device total of a step.

    python bench/quality.py [--seeds 0,1,2] [--epochs 4] [--variants NAME,...] [--task digits|tokens] [--write]

The demo's transfer task (``--task digits``: a TinyMobileNet pretrained on digits 0-4, every
layer fine-tuned on digits 5-9; ``--task tokens``: the token demo's TinyViT on 2x2 patches) is
fine-tuned with Adam (lr 3e-3, batch 64) from the same pretrained weights by each variant, for
each seed (the seed sets the pretraining, the split and the batch order). Variants: plain
autograd, micro-batching (k chunks per batch, gradients accumulated: exact), recompute
(checkpointing every top-level block), and each compression method at several eps, alone and on
micro-batches. For every variant: test accuracy per seed (mean, min, max), the bytes autograd
keeps in one step and the device total of one step (weights + buffers + Adam state + the
batch + the allocator peak of forward+backward, measured with :func:`actcomp.measure` on the
micro-batch the variant runs), both against plain's. The variants of one seed run one after
the other from the same pretrained model, so the seeds' spread is what a user would see.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
import actcomp  # noqa: E402
from actcomp.app.demo import accuracy, make_task  # noqa: E402
from common import machine, markdown_table, publish  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One way to train: compression settings (None: plain), micro-batches per batch, recompute."""

    name: str
    config: Callable[[], actcomp.CompressionConfig] | None = None
    micro_batches: int = 1
    recompute: bool = False


def hosvd(eps: float, **settings) -> Callable[[], actcomp.CompressionConfig]:
    return lambda: actcomp.CompressionConfig("hosvd", eps, **settings)


def method(name: str, eps: float) -> Callable[[], actcomp.CompressionConfig]:
    return lambda: actcomp.CompressionConfig(name, eps)


@actcomp.register_method
class BatchModeKept(actcomp.Compressor):
    """An experiment of this benchmark (not a library method): hosvd with the batch mode kept
    whole (its threshold 1.0) and eps on the other modes, to test whether truncating the batch
    mode is what costs accuracy."""

    name = "bench_hosvd_batch_kept"

    def compress(self, x: Tensor, layout: actcomp.InputLayout, state: object) -> actcomp.Tucker:
        return actcomp.hosvd(x, (1.0,) + (self.config.eps,) * (x.ndim - 1))

    def ranks(self, factors: actcomp.Tucker) -> tuple[int, ...]:  # type: ignore[override]
        return factors.ranks


VARIANTS = {  # names hold no comma: --variants is a comma-separated list
    v.name: v
    for v in [
        Variant("plain"),
        Variant("plain + 4 micro-batches", micro_batches=4),
        Variant("plain + 16 micro-batches", micro_batches=16),
        Variant("hosvd 0.9", hosvd(0.9)),
        Variant("hosvd 0.95", hosvd(0.95)),
        Variant("hosvd 0.99", hosvd(0.99)),
        Variant("svd 0.9", method("svd", 0.9)),
        Variant("asi 0.9", method("asi", 0.9)),
        Variant("hosvd 0.9 + 4 micro-batches", hosvd(0.9), micro_batches=4),
        Variant("hosvd 0.9 + 16 micro-batches", hosvd(0.9), micro_batches=16),
        Variant("hosvd 0.9 (batch mode kept)", method("bench_hosvd_batch_kept", 0.9)),
        Variant("hosvd 0.8 (batch mode kept)", method("bench_hosvd_batch_kept", 0.8)),
    ]
}


def trainable_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, micro_batches: int) -> float:
    """One Adam step on (x, y), the batch split into ``micro_batches`` chunks whose gradients
    accumulate to the full batch's mean-loss gradient (each chunk's loss weighted by its size)."""
    optimizer.zero_grad()
    total = 0.0
    for xc, yc in zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)):
        if len(yc) == 0:
            continue
        loss = nn.functional.cross_entropy(model(xc), yc) * (len(yc) / len(y))
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


def prepare(base: nn.Module, variant: Variant, sample: Tensor) -> nn.Module:
    model = copy.deepcopy(base)
    model.requires_grad_(True)
    if variant.config is not None:
        actcomp.compress(model, "all", config=variant.config(), sample=sample)
    return model


def device_total(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> tuple[int, int, int]:
    """(bytes autograd keeps, allocator peak of forward+backward, device total) of one step on
    (x, y): the total is weights + buffers + optimizer state + the batch + the peak."""
    report = actcomp.measure(model, x, y, nn.functional.cross_entropy, optimizer=optimizer, vanilla=False)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    batch = x.numel() * x.element_size() + y.numel() * y.element_size()
    peak = report.peak_bytes or 0
    return report.saved_bytes, peak, report.weights_bytes + buffers + report.optimizer_state_bytes + batch + peak


def gradient(model: nn.Module, x: Tensor, y: Tensor, micro_batches: int) -> list[Tensor]:
    """The gradient of the mean loss on (x, y) as the variant computes it (no update)."""
    model.zero_grad(set_to_none=True)
    for xc, yc in zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)):
        (nn.functional.cross_entropy(model(xc), yc) * (len(yc) / len(y))).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def relative_error(grads: list[Tensor], reference: list[Tensor]) -> float:
    """||g - g_plain|| / ||g_plain|| over every parameter (what fit's max_error bounds)."""
    num = sum(float((g - r).double().pow(2).sum()) for g, r in zip(grads, reference))
    return (num / sum(float(r.double().pow(2).sum()) for r in reference)) ** 0.5


def gradient_errors(base: nn.Module, model: nn.Module, batches: list[tuple[Tensor, Tensor]], micro_batches: int) -> tuple[float, float]:
    """(mean per-batch relative error, bias) of the variant's gradients against plain's over
    ``batches`` from the same weights: the bias is ||sum_b (g_b - g_plain_b)|| / ||sum_b
    g_plain_b||, the error left after averaging over batches (what an optimizer accumulates)."""
    errors, summed, summed_plain = [], None, None
    for x, y in batches:
        plain = gradient(copy.deepcopy(base).requires_grad_(True), x, y, 1)
        grads = gradient(copy.deepcopy(model), x, y, micro_batches)
        errors.append(relative_error(grads, plain))
        summed = grads if summed is None else [a + b for a, b in zip(summed, grads)]
        summed_plain = plain if summed_plain is None else [a + b for a, b in zip(summed_plain, plain)]
    return statistics.mean(errors), relative_error(summed, summed_plain)


def run_seed(seed: int, variants: list[Variant], epochs: int, batch_size: int) -> dict[str, dict[str, float]]:
    task = make_task(seed=seed, progress=False)
    results = {}
    probes = [(task.train_x[i : i + batch_size], task.train_y[i : i + batch_size]) for i in range(0, 8 * batch_size, batch_size)]
    for variant in variants:
        torch.manual_seed(seed)
        model = prepare(task.base, variant, task.train_x[:2])
        error, bias = gradient_errors(task.base, model, probes, variant.micro_batches)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        start = time.perf_counter()
        steps = 0
        for _ in range(epochs):
            order = torch.randperm(len(task.train_y), generator=generator)
            for begin in range(0, len(order), batch_size):
                index = order[begin : begin + batch_size]
                trainable_step(model, optimizer, task.train_x[index], task.train_y[index], variant.micro_batches)
                steps += 1
        seconds = time.perf_counter() - start
        chunk = max(1, batch_size // variant.micro_batches)
        saved, peak, total = device_total(model, optimizer, task.train_x[:chunk], task.train_y[:chunk])
        results[variant.name] = dict(
            accuracy=accuracy(model, task.test_x, task.test_y), saved=saved, peak=peak, total=total, step_ms=1e3 * seconds / steps,
            grad_error=error, grad_bias=bias,
        )
        print(f"seed {seed} {variant.name}: {100 * results[variant.name]['accuracy']:.1f}%, total {total / 2**20:.2f} MiB, gradient error {error:.3f}, bias {bias:.3f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    variants = [VARIANTS[n] for n in names]
    per_seed = [run_seed(seed, variants, args.epochs, args.batch_size) for seed in seeds]
    plain = per_seed[0].get("plain")
    rows = []
    for variant in variants:
        accs = [100 * r[variant.name]["accuracy"] for r in per_seed]
        first = per_seed[0][variant.name]
        ratio = lambda key: f"{first[key] / plain[key]:.3f}" if plain and plain[key] else "-"  # noqa: E731
        rows.append([
            variant.name,
            f"{statistics.mean(accs):.1f}% ({min(accs):.1f}-{max(accs):.1f})",
            ratio("saved"), ratio("peak"), ratio("total"), f"{first['total'] / 2**20:.2f} MiB",
            f"{statistics.median(r[variant.name]['step_ms'] for r in per_seed):.0f}",
            f"{statistics.mean(r[variant.name]['grad_error'] for r in per_seed):.3f}",
            f"{statistics.mean(r[variant.name]['grad_bias'] for r in per_seed):.3f}",
        ])
    header = ["variant", "test accuracy, mean (min-max)", "saved / plain", "peak / plain", "total / plain", "device total", "ms/step", "gradient error", "gradient bias"]
    command = f"python bench/quality.py --seeds {args.seeds} --epochs {args.epochs} --batch-size {args.batch_size}"
    if names != list(VARIANTS):
        command += f" --variants '{args.variants}'"
    text = (
        f"### Learning quality at equal memory (demo task, every layer trained)\n\n`{command}`; {machine(torch.device('cpu'))}\n\n"
        f"Adam lr 3e-3, batch {args.batch_size}, {args.epochs} epochs, seeds {args.seeds}; memory of one step on the "
        "micro-batch the variant runs (device total = weights + buffers + Adam state + batch + allocator peak); "
        "gradient error: ||g - g_plain|| / ||g_plain|| per batch from the pretrained weights, mean over 8 batches and the "
        "seeds (the measure fit's max_error bounds); gradient bias: the same on the sum of the 8 batches' gradients.\n\n"
        + markdown_table(header, rows)
    )
    publish("quality", text, args.write)


if __name__ == "__main__":
    main()
