"""Whole-step memory of fine-tuning every layer: compressed (with the neighbours' policies)
vs plain autograd, on models we did not write.

    python bench/whole_step.py [--models resnet18,mobilenet_v2,...] [--batch 32] [--size 224]
                               [--eps 0.9] [--activations exact|bits4] [--generic]
                               [--batchnorm factors|input|keep] [--write]
    python bench/whole_step.py --zoo [--batch 4 --size 64]   # every torchvision classifier

For each model (torchvision, random weights, 10 classes, train mode, every Conv/Linear layer
trained), one SGD step on a smooth batch (bilinear upsampling of 7x7 noise): the bytes
autograd keeps (counted once per storage through saved_tensors_hooks, parameters excluded),
the allocator peak of forward+backward (CUDA allocator, or the CPU profiler's allocation
events) and the median step time, compressed and plain alternating. ``compress(model, "all",
method="hosvd", eps=eps)`` with ``Neighbours(activations=..., generic=..., batchnorm=...)``. ``--zoo``
reports saved bytes only, for every classifier torchvision lists.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's actcomp
import actcomp  # noqa: E402
from common import interleaved_medians, machine, markdown_table, publish  # noqa: E402

TARGETS = ("resnet18", "mobilenet_v2", "regnet_x_400mf", "densenet121", "efficientnet_b0")


def smooth_batch(batch: int, size: int, device: torch.device) -> torch.Tensor:
    return F.interpolate(torch.randn(batch, 3, 7, 7, device=device), size=size, mode="bilinear", align_corners=False)


def build(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    # GoogLeNet and Inception: no auxiliary heads (their train-mode output is a tuple)
    extra = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=10, **extra).to(device).train()


def compressed(model: nn.Module, args: argparse.Namespace, sample: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(model)
    neighbours = actcomp.Neighbours(activations=args.activations, generic=args.generic, batchnorm=args.batchnorm)
    return actcomp.compress(model, "all", method="hosvd", eps=args.eps, neighbours=neighbours, sample=sample)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return run


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with actcomp.count_saved(model) as saved:
        loss = F.cross_entropy(model(x), y)
    del loss
    return saved.saved_bytes


def _batchnorm_flag(args: argparse.Namespace) -> str:
    return "" if args.batchnorm == "factors" else f" --batchnorm {args.batchnorm}"


def zoo_size(name: str, size: int) -> int:
    """The input side for a zoo model: transformers at their fixed 224, Inception at >= 75."""
    if name.startswith(("vit", "swin", "maxvit")):
        return max(size, 224)
    return max(size, 75) if name.startswith("inception") or name == "googlenet" else size


def zoo_one(name: str, args: argparse.Namespace, device: torch.device) -> str:
    """One zoo model's saved-bytes ratio, printed as its last line (run in a child process)."""
    torch.manual_seed(args.seed)
    size = zoo_size(name, args.size)
    x, y = smooth_batch(args.batch, size, device), torch.randint(0, 10, (args.batch,), device=device)
    plain = build(name, device)
    model = compressed(plain, args, x[:2])
    return f"{saved_bytes(model, x, y) / saved_bytes(plain, x, y):.3f}"


def zoo(args: argparse.Namespace, device: torch.device) -> None:
    """Every classifier torchvision lists, each in its own process (memory returned between
    models; a hard crash is a row, not the end of the sweep)."""
    names = torchvision.models.list_models(module=torchvision.models)
    rows, worse = [], []
    flags = ["--batch", str(args.batch), "--size", str(args.size), "--eps", str(args.eps), "--activations", args.activations, "--batchnorm", args.batchnorm, "--device", args.device]
    for name in names:
        child = subprocess.run(
            [sys.executable, __file__, "--zoo-one", name, *flags, *(["--generic"] if args.generic else [])],
            capture_output=True, text=True,
        )
        lines = child.stdout.strip().splitlines()
        if child.returncode == 0 and lines:
            ratio = float(lines[-1])
            rows.append([name, f"{zoo_size(name, args.size)}", f"{ratio:.3f}"])
            worse += [name] if ratio > 1 else []
        else:  # a crash is a finding: reported, never hidden
            error = (child.stderr.strip().splitlines() or [f"exit {child.returncode}"])[-1]
            rows.append([name, "error", error[:100]])
        print(*rows[-1], flush=True)
    command = f"python bench/whole_step.py --zoo --batch {args.batch} --size {args.size} --eps {args.eps} --activations {args.activations}" + (" --generic" if args.generic else "") + _batchnorm_flag(args)
    text = (
        f"## Whole step, torchvision classifier zoo, {device.type}, batch {args.batch}, eps {args.eps}\n\n"
        f"Machine: {machine(device)}. Command: `{command}`. Saved bytes of one step with every Conv/Linear "
        "layer compressed and every neighbour handled, over plain autograd's (counted once per storage). "
        f"Models keeping more than plain: {', '.join(worse) if worse else 'none'}.\n\n"
        f"{markdown_table(['model', 'input side', 'saved ratio'], rows)}\n"
    )
    publish(f"whole-step-zoo-{device.type}", text, args.write)


def targets(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(args.seed)  # the same batch in every run: ranks, and so bytes, depend on it
    x = smooth_batch(args.batch, args.size, device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    rows = []
    for name in args.models.split(","):
        plain = build(name, device)
        model = compressed(plain, args, x[:2])
        kept_plain, kept = saved_bytes(plain, x, y), saved_bytes(model, x, y)
        report = actcomp.measure(model, x, y, F.cross_entropy)  # peaks of both (plain: suspended)
        medians = interleaved_medians({"plain": make_step(plain, x, y), "compressed": make_step(model, x, y)}, device, args.rounds, args.per_round)
        peak = f"{report.peak_bytes / report.vanilla_peak_bytes:.3f}" if report.peak_bytes and report.vanilla_peak_bytes else "n/a"
        rows.append([
            name, f"{kept_plain / 2**20:.1f} MiB", f"{kept / 2**20:.1f} MiB", f"**{kept / kept_plain:.3f}**",
            f"{(report.vanilla_peak_bytes or 0) / 2**20:.0f} MiB", f"{(report.peak_bytes or 0) / 2**20:.0f} MiB", f"**{peak}**",
            f"{medians['plain']:.0f}", f"{medians['compressed']:.0f}", f"{medians['compressed'] / medians['plain']:.2f}",
        ])
        print(" | ".join(rows[-1]), flush=True)
    header = ["model", "plain saved", "saved", "saved ratio", "plain peak", "peak", "peak ratio", "plain ms", "ms", "time ratio"]
    command = (
        f"python bench/whole_step.py --models {args.models} --batch {args.batch} --size {args.size} --eps {args.eps} "
        f"--activations {args.activations}{' --generic' if args.generic else ''}{_batchnorm_flag(args)} --rounds {args.rounds} --per-round {args.per_round}"
    )
    key = f"whole-step-{device.type}-{args.activations}{'-generic' if args.generic else ''}{'' if args.batchnorm == 'factors' else '-bn-' + args.batchnorm}"
    text = (
        f"## Whole step, every layer trained, {device.type}, batch {args.batch}, {args.size}x{args.size}, hosvd eps {args.eps}, "
        f"activations {args.activations}{', generic packer' if args.generic else ''}{'' if args.batchnorm == 'factors' else ', batchnorm ' + args.batchnorm}\n\n"
        f"Machine: {machine(device)}. Command: `{command}`. Saved: what autograd keeps in one step, "
        "counted once per storage; peak: allocator high-water mark of forward+backward above the "
        f"weights (gradients included); time: median SGD step of {args.rounds * args.per_round}, variants alternating.\n\n"
        f"{markdown_table(header, rows)}\n"
    )
    publish(key, text, args.write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(TARGETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--eps", type=float, default=0.9)
    parser.add_argument("--activations", default="exact")
    parser.add_argument("--batchnorm", default="factors", choices=["factors", "input", "keep"])
    parser.add_argument("--generic", action="store_true")
    parser.add_argument("--zoo", action="store_true")
    parser.add_argument("--zoo-one", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch (default 0)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-round", type=int, default=1)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.zoo_one:
        print(zoo_one(args.zoo_one, args, device))
    elif args.zoo:
        zoo(args, device)
    else:
        targets(args, device)


if __name__ == "__main__":
    main()
