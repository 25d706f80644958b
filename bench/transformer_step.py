"""Whole-step memory of fine-tuning transformers with every Linear-like layer compressed,
with and without the generic packer and the 4-bit activations, against plain autograd.

    python bench/transformer_step.py [--models vit_b_16,swin_t,gpt2,bert] [--batch 4] [--size 112]
                                     [--seq 128] [--eps 0.9] [--write]

Models (random weights, no download): torchvision vit_b_16 and swin_t at --size x --size
(10 classes), Hugging Face GPT-2 (4 layers, width 256, 4 heads, vocabulary 1000) and BERT
(4 layers, width 256, 4 heads, MLP 1024, 10 classes) on --seq random tokens. For each model,
``compress(model, "all", method="hosvd", eps=eps, sample=x[:1], neighbours=Neighbours(
activations=a, generic=g))`` for a in (exact, bits4) and g in (False, True), then
``actcomp.measure`` of one training step (train mode, every parameter trained): what autograd
keeps (once per storage, parameters excluded) and the allocator peak of forward+backward (CPU
profiler allocation events, or the CUDA allocator), each next to the same step under plain
autograd (``suspended``). Medians over --repeats measurements. Layers whose parent's forward
uses their weight itself (MultiheadAttention's out_proj, swin's qkv/proj) are left out by
layers="all" with sample= and counted in the table. A second table lists, per module of the
first transformer block, what it keeps and under which policy with the whole step compressed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's actcomp
import actcomp  # noqa: E402
from actcomp.memory import format_bytes  # noqa: E402
from actcomp.core.state import KernelNotRunWarning  # noqa: E402
from common import machine, markdown_table, publish  # noqa: E402

MODELS = ("vit_b_16", "swin_t", "gpt2", "bert")
FIRST_BLOCK = {
    "vit_b_16": "encoder.layers.encoder_layer_0.",
    "swin_t": "features.1.0.",
    "gpt2": "transformer.h.0.",
    "bert": "bert.encoder.layer.0.",
}


def build(name: str, args: argparse.Namespace, device: torch.device):
    """(model, inputs, targets, loss_fn) with random weights and a seeded batch."""
    torch.manual_seed(0)
    if name in ("vit_b_16", "swin_t"):
        import torchvision

        kwargs = {"image_size": args.size} if name == "vit_b_16" else {}
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
        grid = torch.randn(args.batch, 3, 7, 7)
        x = F.interpolate(grid, size=args.size, mode="bilinear", align_corners=False)
        y = torch.randint(0, 10, (args.batch,))
        return model.to(device), x.to(device), y.to(device), F.cross_entropy
    import transformers

    tokens = torch.randint(0, 1000, (args.batch, args.seq))
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000, n_positions=args.seq, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)

        def lm_loss(out, targets):
            return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())

        return model.to(device), tokens.to(device), tokens.to(device), lm_loss
    config = transformers.BertConfig(
        num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024, vocab_size=1000,
        max_position_embeddings=args.seq, num_labels=10,
    )
    model = transformers.BertForSequenceClassification(config)
    return model.to(device), tokens.to(device), torch.randint(0, 10, (args.batch,), device=device), lambda out, t: F.cross_entropy(out.logits, t)


def linear_like(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


def measured(model, x, y, loss_fn, repeats: int):
    reports = [actcomp.measure(model, x, y, loss_fn) for _ in range(repeats)]
    median = lambda values: statistics.median(values) if all(v is not None for v in values) else None  # noqa: E731
    return reports[-1], median([r.saved_bytes for r in reports]), median([r.vanilla_saved_bytes for r in reports]), median(
        [r.peak_bytes for r in reports]
    ), median([r.vanilla_peak_bytes for r in reports])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows, block_rows = [], []
    for name in args.models.split(","):
        base, x, y, loss_fn = build(name, args, device)
        base.train()
        for activations in ("exact", "bits4"):
            for generic in (False, True):
                model = copy.deepcopy(base)
                neighbours = actcomp.Neighbours(activations=activations, generic=generic)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", KernelNotRunWarning)
                    actcomp.compress(model, "all", method="hosvd", eps=args.eps, sample=x[:1], neighbours=neighbours)
                layers = actcomp.compressed_layers(model)
                left_out = len(linear_like(model) - set(layers))
                report, saved, plain_saved, peak, plain_peak = measured(model, x, y, loss_fn, args.repeats)
                rows.append([
                    name, activations, "yes" if generic else "no", f"{len(layers)} ({left_out} left out)",
                    format_bytes(plain_saved), format_bytes(saved), f"**{saved / plain_saved:.3f}**",
                    format_bytes(plain_peak) if plain_peak else "n/a", format_bytes(peak) if peak else "n/a",
                    f"**{peak / plain_peak:.3f}**" if peak and plain_peak else "n/a",
                ])
                print(" | ".join(rows[-1]), flush=True)
                if activations == "bits4" and generic:
                    prefix = FIRST_BLOCK[name]
                    for row in report.rows:
                        if row.name.startswith(prefix) and (row.saved_bytes or row.vanilla_saved_bytes):
                            block_rows.append([
                                name, row.name[len(prefix):], row.layer_type, row.kind, row.policy or "-",
                                format_bytes(row.vanilla_saved_bytes or 0), format_bytes(row.saved_bytes),
                            ])
    header = ["model", "activations", "generic", "layers compressed", "plain saved", "saved", "saved ratio", "plain peak", "peak", "peak ratio"]
    command = (
        f"python bench/transformer_step.py --models {args.models} --batch {args.batch} --size {args.size} --seq {args.seq} "
        f"--eps {args.eps} --repeats {args.repeats}"
    )
    text = (
        f"## Whole step, transformers, {device.type}, batch {args.batch}, images {args.size}x{args.size}, {args.seq} tokens, hosvd eps {args.eps}\n\n"
        f"Machine: {machine(device)}. Command: `{command}`. Every Linear-like layer compressed "
        "(`layers=\"all\"` with `sample=`; layers whose parent's forward uses their weight itself are left out and counted); "
        "neighbours `Neighbours(activations=..., generic=...)` at the same eps. Saved: what autograd keeps in one step, "
        "once per storage, parameters excluded; peak: allocator high-water mark of forward+backward above what was "
        f"allocated before (gradients included); plain: the same step with compression suspended. Medians of {args.repeats}.\n\n"
        f"{markdown_table(header, rows)}\n\n"
        "Per module of the first block, whole step (activations bits4, generic packer): what plain autograd keeps and "
        "what the compressed step keeps, with the policy (`factors`: a compressed layer's input; `packed`: the generic "
        "packer's factors; `bits4`: a 4-bit code; `plain`: kept as it is).\n\n"
        f"{markdown_table(['model', 'module', 'type', 'kind', 'policy', 'plain', 'kept'], block_rows)}\n"
    )
    publish(f"transformer-step-{device.type}-batch{args.batch}-{args.size}px-{args.seq}tokens", text, args.write)


if __name__ == "__main__":
    main()
