"""Per-layer forward+backward time and bytes kept: compressed vs plain autograd.

    python bench/layers.py [--device cpu|cuda] [--methods hosvd,asi,svd,oneshot] [--eps 0.8] [--threads N] [--write]

For each of six MobileNetV2/ResNet layer shapes, the input is post-ReLU and spatially smooth
(relu(avg_pool3x3(randn))) and requires grad (a middle layer: dX is computed too). Plain and
compressed runs alternate in rounds; the table gives medians and their ratio, and the bytes
autograd keeps for each (counted with saved_tensors_hooks, parameters excluded). Every step gets
the same input: ``oneshot`` computes its bases on the first (warm-up) step and then only
projects (its steady state; a refresh costs one hosvd step).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The repository root first, so that this checkout's actcomp is measured (not an installed one).
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import actcomp  # noqa: E402
from common import interleaved_medians, machine, markdown_table, publish  # noqa: E402

# name: (C_in, C_out, kernel, groups, H)
SHAPES = {
    "dw3x3 32ch 56x56": (32, 32, 3, 32, 56),
    "1x1 96->576 14x14": (96, 576, 1, 1, 14),
    "dw3x3 576ch 14x14": (576, 576, 3, 576, 14),
    "1x1 160->960 7x7": (160, 960, 1, 1, 7),
    "1x1 320->1280 7x7": (320, 1280, 1, 1, 7),
    "3x3 256->256 14x14": (256, 256, 3, 1, 14),
}


def smooth_input(batch: int, channels: int, size: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(batch, channels, size + 2, size + 2, device=device)
    return F.relu(F.avg_pool2d(x, 3, 1)).requires_grad_()


def step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 128 on CUDA")
    parser.add_argument("--methods", default="hosvd,asi,svd,oneshot")
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 32)
    methods = [m for m in args.methods.split(",") if m]
    torch.manual_seed(0)

    header = ["layer", "plain ms"] + [f"{m} ms" for m in methods] + [f"{m} / plain" for m in methods]
    header += ["plain kept"] + [f"{m} kept (ratio)" for m in methods]
    rows = []
    for name, (c_in, c_out, k, groups, size) in SHAPES.items():
        plain = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups).to(device)
        x = smooth_input(batch, c_in, size, device)
        dy = torch.randn(batch, c_out, size, size, device=device)
        layers = {"plain": plain}
        for method in methods:
            layers[method] = actcomp.compress(copy.deepcopy(plain), method=method, eps=args.eps)
        medians = interleaved_medians({n: step(l, x, dy) for n, l in layers.items()}, device, args.rounds, args.per_round)
        kept = {}
        for n, layer in layers.items():
            with actcomp.count_saved(layer) as saved:
                y = layer(x)
            kept[n] = saved.saved_bytes
            del y
        row = [name, f"{medians['plain']:.2f}"]
        row += [f"{medians[m]:.2f}" for m in methods]
        row += [f"**{medians[m] / medians['plain']:.2f}**" for m in methods]
        row += [f"{kept['plain'] / 2**20:.2f} MiB"]
        row += [f"{kept[m] / 2**20:.3f} MiB ({kept[m] / kept['plain']:.3f})" for m in methods]
        rows.append(row)
        print(" | ".join(row), flush=True)
    table = markdown_table(header, rows)
    threads = f" --threads {args.threads}" if args.threads else ""
    command = f"python bench/layers.py --device {device.type} --batch {batch} --methods {args.methods} --eps {args.eps}{threads} --rounds {args.rounds} --per-round {args.per_round}"
    text = (
        f"## Per-layer forward+backward, {device.type}, batch {batch}, eps {args.eps}{f', {args.threads} thread' if args.threads else ''}\n\n"
        f"Machine: {machine(device)}. Command: `{command}`. "
        f"Medians of {args.rounds * args.per_round} runs each, plain and compressed alternating.\n\n{table}\n"
    )
    publish(f"layers-{device.type}" + (f"-{args.threads}thread" if args.threads else ""), text, args.write)


if __name__ == "__main__":
    main()
