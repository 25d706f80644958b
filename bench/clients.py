"""What a training step keeps with actcomp on models as their ecosystems build them: Hugging
Face LLaMA (from config, random weights), the same with peft LoRA (r 8 on q_proj and v_proj),
and timm image models, against plain autograd.

    python bench/clients.py [--eps 0.9,0.95,1.0] [--models llama,llama-lora,efficientnet_b0,...]
                            [--variants default,generic,norm,norm-exact,norm+generic] [--write]

Each row is one ``actcomp.measure`` of one training step on the CPU (batch 4; LLaMA: hidden
128, 2 layers, 64 tokens, dict batches with labels, the output's ``.loss``; timm: 64 px,
cross-entropy): saved = what autograd kept (counted once per storage), plain = the same step
with compression suspended, peak = the CPU profiler's allocation high-water mark of the step.
``compress`` runs with ``sample=`` the batch and default neighbours (layers="all": every
trained Linear/Conv; under LoRA only A and B, the frozen base layers are left out); the
``+generic`` rows add ``Neighbours(generic=True)``, which packs the other large saved tensors
(attention, norms, activations) as factors at the same eps; the ``+norm`` rows add
``Neighbours(norm="factors")``: LayerNorm / RMSNorm keep factors of their normalised input, the
``+norm-exact`` rows ``Neighbours(norm="exact")``: they keep their input and per-row statistics
(``--variants`` picks them). grad error = ||g - g_plain|| / ||g_plain|| over every trained
parameter's gradient of one step on the same batch, compressed against suspended.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import actcomp  # noqa: E402
from actcomp.core.batch import call_model, probe_loss  # noqa: E402
from common import machine, markdown_table, publish  # noqa: E402


def llama(lora: bool):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).train()
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}, None, None


def timm_model(name: str, **kwargs):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).train()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([0, 1, 2, 3]), F.cross_entropy


MODELS = {
    "llama": lambda: llama(False),
    "llama-lora": lambda: llama(True),
    "efficientnet_b0": lambda: timm_model("efficientnet_b0"),
    "mobilenetv3_large_100": lambda: timm_model("mobilenetv3_large_100"),
    "convnext_atto": lambda: timm_model("convnext_atto"),
    "vit_tiny": lambda: timm_model("vit_tiny_patch16_224", img_size=64),
}

#: Neighbours settings of each variant (a row's eps column gets " +<variant>" unless default).
VARIANTS = {
    "default": "auto",
    "generic": actcomp.Neighbours(generic=True),
    "norm": actcomp.Neighbours(norm="factors"),
    "norm-exact": actcomp.Neighbours(norm="exact"),
    "norm+generic": actcomp.Neighbours(norm="factors", generic=True),
}


def kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.0f}"


def gradient_error(model, inputs, targets, loss_fn) -> float:
    """||g - g_plain|| / ||g_plain|| over every trained parameter: one step compressed, one
    with compression suspended, on the same batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for context in (contextlib.nullcontext(), actcomp.suspended(model)):
        with context:
            torch.manual_seed(2)
            loss = probe_loss(call_model(model, inputs), targets, loss_fn)
            found = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(params, found)]))
    return ((grads[0] - grads[1]).norm() / grads[1].norm()).item()


def rows_for(name: str, grid: list[float], variants: list[str]) -> list[list[str]]:
    rows = []
    for variant in variants:
        for eps in grid:
            model, inputs, targets, loss_fn = MODELS[name]()
            actcomp.compress(model, sample=inputs, eps=eps, neighbours=VARIANTS[variant])
            report = actcomp.measure(model, inputs, targets, loss_fn)
            fell_back = sum(1 for s in actcomp.stats(model).values() if s.method == "plain")
            rows.append([
                name, f"{eps}" + ("" if variant == "default" else f" +{variant}"), str(len(actcomp.compressed_layers(model))), str(fell_back),
                kib(report.saved_bytes), kib(report.vanilla_saved_bytes), f"{report.saved_bytes / report.vanilla_saved_bytes:.3f}",
                kib(report.peak_bytes), kib(report.vanilla_peak_bytes),
                f"{report.peak_bytes / report.vanilla_peak_bytes:.3f}" if report.peak_bytes and report.vanilla_peak_bytes else "-",
                f"{gradient_error(model, inputs, targets, loss_fn):.3f}",
            ])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eps", default="0.9,0.95,1.0")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default="default,generic", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--key", default="clients")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = [float(e) for e in args.eps.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    rows = []
    for name in args.models.split(","):
        rows += rows_for(name, grid, variants)
    header = ["model", "eps", "compressed layers", "kept input (plain)", "saved KiB", "plain KiB", "saved ratio",
              "peak KiB", "plain peak KiB", "peak ratio", "grad error"]
    command = "python bench/clients.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "## Real clients: Hugging Face LLaMA, peft LoRA, timm (bench/clients.py)",
        "",
        f"`{command.strip()}` on {machine(torch.device('cpu'))}. One measured training step per row "
        "(`actcomp.measure`: saved bytes counted once per storage; peak from CPU profiler allocation events). "
        "'kept input (plain)': compressed layers whose factors would have outweighed their input, which kept the input. "
        "'+generic': `Neighbours(generic=True)`; '+norm': `Neighbours(norm=\"factors\")` (LayerNorm / RMSNorm keep factors "
        "of their normalised input); '+norm-exact': `Neighbours(norm=\"exact\")` (they keep their input and per-row statistics). grad error: ||g - g_plain|| / ||g_plain|| over every trained parameter, one step.",
        "",
        markdown_table(header, rows),
    ])
    publish(args.key, text, args.write)


if __name__ == "__main__":
    main()
