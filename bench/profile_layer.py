"""Where the time of one compressed layer goes: torch.profiler's table of the top ops.

    python bench/profile_layer.py --shape "dw3x3 576ch 14x14" [--device cuda] [--method hosvd] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

# The repository root first, so that this checkout's actcomp is measured (not an installed one).
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import actcomp  # noqa: E402
from layers import SHAPES, smooth_input  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="dw3x3 576ch 14x14", choices=list(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--method", default="hosvd")
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 32)
    c_in, c_out, k, groups, size = SHAPES[args.shape]
    layer = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups).to(device)
    if args.method != "plain":
        actcomp.compress(layer, method=args.method, eps=args.eps)
    x = smooth_input(batch, c_in, size, device)
    dy = torch.randn(batch, c_out, size, size, device=device)
    for _ in range(3):
        layer(x).backward(dy)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            layer(x).backward(dy)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.shape}, {args.method}, batch {batch}, {device}, {torch.get_num_threads()} threads: 5 steps")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
