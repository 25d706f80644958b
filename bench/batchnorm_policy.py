"""BatchNorm on batch statistics: factors of x_hat (``Neighbours(batchnorm="factors")``, the
default) against factors of its input (``batchnorm="input"``): the bytes a step keeps and the
error of the gradients, at several eps.

    python bench/batchnorm_policy.py [--models regnet_x_400mf,resnet18,mobilenet_v2]
                                     [--batch 16] [--size 112] [--eps 0.9,0.95,0.99]
                                     [--seeds 3] [--write]

For each model (torchvision, random weights, 10 classes, train mode, every Conv/Linear layer
trained, smooth inputs: bilinear upsampling of 7x7 noise) and seed, one step with plain
autograd and one with ``compress(model, "all", method="hosvd", eps=eps, neighbours=
Neighbours(batchnorm=policy))`` on the same batch: saved bytes over plain autograd's (counted
once per storage; dropout draws the same masks in both), the relative error of all
parameter gradients together,
||g - g_plain|| / ||g_plain||, and the median over parameters of each one's relative error.
Medians over the seeds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's actcomp
import actcomp  # noqa: E402
from common import machine, markdown_table, publish  # noqa: E402


def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """(saved bytes, parameter gradients) of one training step; the random numbers are reset
    first, so that dropout draws the same masks in the plain and the compressed step."""
    torch.manual_seed(12345)
    model.zero_grad(set_to_none=True)
    with actcomp.count_saved(model) as saved:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return saved.saved_bytes, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def errors(grads: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(relative error of all gradients together, median of the per-parameter ones)."""
    diff = torch.cat([(grads[n] - g).flatten() for n, g in plain.items()])
    whole = torch.cat([g.flatten() for g in plain.values()])
    each = [((grads[n] - g).norm() / g.norm()).item() for n, g in plain.items() if g.norm() > 0]
    return (diff.norm() / whole.norm()).item(), statistics.median(each)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="regnet_x_400mf,resnet18,mobilenet_v2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--eps", default="0.9,0.95,0.99")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu")
    rows = []
    for name in args.models.split(","):
        for eps in (float(e) for e in args.eps.split(",")):
            for policy in ("factors", "input"):
                ratios, totals, medians = [], [], []
                for seed in range(args.seeds):
                    torch.manual_seed(seed)
                    plain = torchvision.models.get_model(name, weights=None, num_classes=10).train()
                    x = F.interpolate(torch.randn(args.batch, 3, 7, 7), size=args.size, mode="bilinear", align_corners=False)
                    y = torch.randint(0, 10, (args.batch,))
                    model = copy.deepcopy(plain)  # same weights and BatchNorm statistics
                    plain_bytes, plain_grads = step(plain, x, y)
                    neighbours = actcomp.Neighbours(batchnorm=policy)
                    actcomp.compress(model, "all", method="hosvd", eps=eps, neighbours=neighbours, sample=x[:2])
                    kept, grads = step(model, x, y)
                    total, median = errors(grads, plain_grads)
                    ratios.append(kept / plain_bytes)
                    totals.append(total)
                    medians.append(median)
                rows.append([name, f"{eps:g}", policy, f"**{statistics.median(ratios):.3f}**", f"{statistics.median(totals):.3f}", f"{statistics.median(medians):.3f}"])
                print(" | ".join(rows[-1]), flush=True)
    command = f"python bench/batchnorm_policy.py --models {args.models} --batch {args.batch} --size {args.size} --eps {args.eps} --seeds {args.seeds}"
    text = (
        f"## BatchNorm policy: factors of x_hat or of the input, cpu, batch {args.batch}, {args.size}x{args.size}\n\n"
        f"Machine: {machine(device)}. Command: `{command}`. Every Conv/Linear layer trained, hosvd at eps, "
        "default neighbours but for `batchnorm`. Saved: bytes kept over plain autograd's; gradient error: "
        "||g - g_plain|| / ||g_plain|| over all parameters, and the median over parameters of each one's; "
        f"medians over {args.seeds} seeds (weights and batch).\n\n"
        f"{markdown_table(['model', 'eps', 'batchnorm', 'saved ratio', 'gradient error', 'median per parameter'], rows)}\n"
    )
    publish(f"batchnorm-policy-cpu-batch{args.batch}", text, args.write)


if __name__ == "__main__":
    main()
