"""Whole-model training step: compressed vs plain autograd, time and bytes kept.

    python bench/models.py [--device cpu|cuda] [--size 96] [--methods asi,hosvd] [--threads N] [--write]

torchvision mobilenet_v2 and resnet18 (random weights, 10 classes), SGD step on a fixed batch,
with the last 4 and with all Conv/Linear layers compressed (layers chosen in execution order).
Time: median step time (forward, backward, optimizer step), plain and compressed alternating.
Bytes: what autograd keeps in one step (saved_tensors_hooks, all modules), and the allocator
peak on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

# The repository root first, so that this checkout's actcomp is measured (not an installed one).
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import actcomp  # noqa: E402
from common import interleaved_medians, machine, markdown_table, publish  # noqa: E402

MODELS = {"mobilenet_v2": torchvision.models.mobilenet_v2, "resnet18": torchvision.models.resnet18}


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return run


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with actcomp.count_saved(model) as saved:
        loss = nn.functional.cross_entropy(model(x), y)
    del loss
    return saved.saved_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 128 on CUDA")
    parser.add_argument("--size", type=int, default=None, help="image side, default 96 on CPU, 224 on CUDA")
    parser.add_argument("--methods", default="asi,hosvd")
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 32)
    size = args.size or (224 if device.type == "cuda" else 96)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    rows = []
    for name, build in MODELS.items():
        base = build(num_classes=10).to(device)
        variants = {"plain": base}
        for method in args.methods.split(","):
            for layers in ("last:4", "all"):
                model = copy.deepcopy(base)
                actcomp.compress(model, layers, method=method, eps=args.eps, sample=x[:1])
                variants[f"{method} {layers}"] = model
        medians = interleaved_medians({k: make_step(m, x, y) for k, m in variants.items()}, device, args.rounds, args.per_round)
        kept = {k: saved_bytes(m, x, y) for k, m in variants.items()}
        for key in variants:
            if key == "plain":
                continue
            rows.append([
                name, key, f"{medians['plain']:.1f}", f"{medians[key]:.1f}", f"**{medians[key] / medians['plain']:.2f}**",
                f"{kept['plain'] / 2**20:.1f} MiB", f"{kept[key] / 2**20:.1f} MiB", f"{kept[key] / kept['plain']:.3f}",
            ])
            print(" | ".join(rows[-1]), flush=True)
    header = ["model", "compressed", "plain ms", "compressed ms", "time ratio", "plain kept", "compressed kept", "kept ratio"]
    command = (
        f"python bench/models.py --device {device.type} --batch {batch} --size {size} --methods {args.methods} "
        f"--eps {args.eps}{f' --threads {args.threads}' if args.threads else ''} --rounds {args.rounds} --per-round {args.per_round}"
    )
    text = (
        f"## Whole-model training step, {device.type}, batch {batch}, {size}x{size}, eps {args.eps}"
        f"{f', {args.threads} thread' if args.threads else ''}\n\n"
        f"Machine: {machine(device)}. Command: `{command}`. Medians of {args.rounds * args.per_round} SGD steps each, "
        "variants alternating; kept = everything autograd keeps in one step (all modules).\n\n"
        f"{markdown_table(header, rows)}\n"
    )
    publish(f"models-{device.type}" + (f"-{args.threads}thread" if args.threads else ""), text, args.write)


if __name__ == "__main__":
    main()
