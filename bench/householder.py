"""Householder products (FastH's blocked WY) and SVD-parametrised fine-tuning (actcomp.peft).

    python bench/householder.py [--device cpu|cuda] [--sizes 256,512,1024] [--write]
    python bench/householder.py --finetune [--lr 3e-3] [--write]

Timing (default): Q X for Q = H(v_1) ... H(v_d), d reflections of length d (a full orthogonal
matrix, as in FastH), X of shape (d, batch): blocked WY (actcomp.peft.householder_apply),
one reflection at a time (householder_sequential), and the dense product W X with a d x d
matrix (what a plain layer costs), forward and forward+backward (gradients of the vectors, or
of W, and of X). Then the block-size sweep that chose the default block, and one training
step of an SVD-parametrised Linear against nn.Linear. The three variants alternate in rounds;
tables give medians.

--finetune: `actcomp compare --peft` as a table (trainable parameters, bytes kept by the
fine-tuned layers, accuracy) for the demo's digits task.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's actcomp, not an installed one
from common import interleaved_medians, machine, markdown_table, publish  # noqa: E402
from actcomp.peft import DEFAULT_BLOCK_SIZE, householder_apply, householder_sequential, svd_adapt  # noqa: E402


def product_runs(d: int, batch: int, block_size: int, device: torch.device, backward: bool) -> dict:
    """Closures computing Q X (and, with ``backward``, its gradients) three ways."""
    gen = torch.Generator(device="cpu").manual_seed(d)
    v = torch.randn(d, d, generator=gen).to(device).requires_grad_(backward)
    x = torch.randn(d, batch, generator=gen).to(device).requires_grad_(backward)
    w = torch.randn(d, d, generator=gen).to(device).requires_grad_(backward)
    g = torch.randn(d, batch, generator=gen).to(device)

    def run(compute):
        def step() -> None:
            if not backward:
                with torch.no_grad():
                    compute()
                return
            v.grad = x.grad = w.grad = None
            (compute() * g).sum().backward()

        return step

    return {
        "blocked": run(lambda: householder_apply(v, x, block_size)),
        "sequential": run(lambda: householder_sequential(v, x)),
        "dense": run(lambda: w @ x),
    }


def products_section(sizes: list[int], batch: int, device: torch.device, rounds: int, per_round: int) -> str:
    header = ["d", "blocked ms", "sequential ms", "dense ms", "sequential / blocked", "blocked / dense"]
    rows = []
    for backward in (False, True):
        for d in sizes:
            m = interleaved_medians(product_runs(d, batch, DEFAULT_BLOCK_SIZE, device, backward), device, rounds, per_round)
            what = "forward+backward" if backward else "forward"
            row = [f"{d} ({what})", f"{m['blocked']:.3f}", f"{m['sequential']:.3f}", f"{m['dense']:.3f}",
                   f"**{m['sequential'] / m['blocked']:.1f}**", f"{m['blocked'] / m['dense']:.1f}"]
            rows.append(row)
            print(" | ".join(row), flush=True)
    return markdown_table(header, rows)


def blocks_section(d: int, batch: int, block_sizes: list[int], device: torch.device, rounds: int, per_round: int) -> str:
    header = ["block size", "forward ms", "forward+backward ms"]
    forward, both = {}, {}
    for backward, into in ((False, forward), (True, both)):
        runs = {m: product_runs(d, batch, m, device, backward)["blocked"] for m in block_sizes}
        into.update(interleaved_medians({str(m): f for m, f in runs.items()}, device, rounds, per_round))
    rows = [[str(m), f"{forward[str(m)]:.3f}", f"{both[str(m)]:.3f}"] for m in block_sizes]
    return markdown_table(header, rows)


def layer_section(d: int, batch: int, reflections: list[int], device: torch.device, rounds: int, per_round: int) -> str:
    """One forward+backward of nn.Linear(d, d) vs the SVD-parametrised layer."""
    torch.manual_seed(0)
    plain = nn.Linear(d, d).to(device)
    x = torch.randn(batch, d, device=device)
    dy = torch.randn(batch, d, device=device)
    layers = {"nn.Linear": plain, "svd s": svd_adapt(nn.Sequential(nn.Linear(d, d)), "all", train="s")[0].to(device)}
    for r in reflections:
        layers[f"svd s+q r={r}"] = svd_adapt(nn.Sequential(nn.Linear(d, d)), "all", reflections=r)[0].to(device)

    def step(layer):
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)

        return run

    m = interleaved_medians({n: step(l) for n, l in layers.items()}, device, rounds, per_round)
    params = {n: sum(p.numel() for p in l.parameters() if p.requires_grad) for n, l in layers.items()}
    rows = [[n, str(params[n]), f"{m[n]:.3f}", f"{m[n] / m['nn.Linear']:.2f}"] for n in layers]
    return markdown_table(["layer", "trainable params", "step ms", "/ nn.Linear"], rows)


def finetune_section(args: argparse.Namespace) -> str:
    from actcomp.app.compare import run_peft_compare

    points = run_peft_compare(max_layers=args.max_layers, reflections=args.reflections, eps=args.eps, lr=args.lr, progress=False)
    header = ["method", "layers", "trainable params", "kept by the layers", "accuracy"]
    rows = [[p.method, str(p.layers), str(p.trainable_params), f"{p.layer_bytes / 1024:.1f} KiB", f"{100 * p.accuracy:.1f}%"] for p in points]
    command = f"python bench/householder.py --finetune --max-layers {args.max_layers} --reflections {args.reflections} --eps {args.eps} --lr {args.lr}"
    return (
        f"## SVD-parametrised fine-tuning on the demo task, lr {args.lr:g}\n\n"
        f"Machine: {machine(torch.device('cpu'))}. Command: `{command}` (the same runs as `actcomp compare --peft`). "
        "TinyMobileNet pretrained on digits 0-4, last N Conv/Linear layers fine-tuned on 5-9 for 6 epochs "
        "(Adam, batch 64, seed 0); `full` trains every Conv/Linear layer. In the svd runs the new classifier is "
        "trained plainly and the other N-1 layers are SVD-parametrised; biases of the chosen layers train in every "
        "run. One split, one seed.\n\n" + markdown_table(header, rows) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="256,512,1024")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block-sizes", default="8,16,32,64,128")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--finetune", action="store_true", help="the demo fine-tuning comparison instead of timings")
    parser.add_argument("--max-layers", type=int, default=4)
    parser.add_argument("--reflections", type=int, default=8)
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.finetune:
        publish(f"peft-finetune-lr{args.lr:g}", finetune_section(args), args.write)
        return
    device = torch.device(args.device)
    torch.set_grad_enabled(True)
    sizes = [int(s) for s in args.sizes.split(",")]
    blocks = [int(b) for b in args.block_sizes.split(",")]
    command = (
        f"python bench/householder.py --device {device.type} --sizes {args.sizes} --batch {args.batch} "
        f"--block-sizes {args.block_sizes} --rounds {args.rounds} --per-round {args.per_round}"
        + (f" --threads {args.threads}" if args.threads else "")
    )
    sweep_d = 512 if 512 in sizes else sizes[0]
    text = (
        f"## Householder products (blocked WY), {device.type}\n\n"
        f"Machine: {machine(device)}. Command: `{command}`. Medians of {args.rounds * args.per_round} runs each, "
        "variants alternating.\n\n"
        f"Q X with d reflections of length d, X of shape (d, {args.batch}); blocked WY with block "
        f"{DEFAULT_BLOCK_SIZE}; dense = W X with a d x d matrix:\n\n"
        + products_section(sizes, args.batch, device, args.rounds, args.per_round)
        + f"\n\nBlock size, d = {sweep_d}, batch {args.batch}:\n\n"
        + blocks_section(sweep_d, args.batch, blocks, device, args.rounds, args.per_round)
        + f"\n\nOne training step (forward+backward) of a {sweep_d} x {sweep_d} layer, batch {args.batch}:\n\n"
        + layer_section(sweep_d, args.batch, [8, 32], device, args.rounds, args.per_round)
        + "\n"
    )
    publish(f"householder-{device.type}", text, args.write)


if __name__ == "__main__":
    main()
