"""Which error measure should plan() minimise: accuracy after fine-tuning with each measure's plan.

    python bench/plan_quality.py [--seeds 0,1,2] [--fractions 0.1,0.2,0.35] [--write]

On the demo's transfer task (TinyMobileNet pretrained on digits 0-4, fine-tuned on 5-9, Adam lr
3e-3, batch 64, the demo's 6 epochs), :func:`actcomp.plan` chooses, for every layer, frozen or
HOSVD at an eps of its grid, under a budget of bytes autograd keeps given as a fraction of what
it keeps with every layer trained at eps 1 (its roomiest plan), calibrated on the first batch as
the demo does. Each budget is planned twice: minimising the averaged error (the default:
sqrt(bias^2 + spread^2 / 10) per layer over the batch's 8 chunks) and the relative error
||dW_eps - dW|| / ||dW|| (the old default). Each plan fine-tunes the same pretrained model with
every seed (the batch order); the table gives the plan's choices, what it predicts autograd
keeps, its total error under both measures, and the test accuracy (mean, min-max), beside plain
autograd with every layer trained.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
from actcomp import CompressionConfig, plan  # noqa: E402
from actcomp.app.demo import accuracy, finetune_copy, make_task  # noqa: E402
from actcomp.attach.select import select_layers  # noqa: E402
from actcomp.memory.measure import format_bytes  # noqa: E402
from common import machine, markdown_table, publish  # noqa: E402

LOSS = nn.functional.cross_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.1,0.2,0.35", help="budgets as fractions of the roomiest plan's saved bytes")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md (section plan-quality)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    task = make_task(6, 64, 0, False)
    names = select_layers(task.base, "all")
    calib = [(task.train_x[:64], task.train_y[:64])]
    roomy = plan(task.base, calib, budget=10**12, loss_fn=LOSS, eps_grid=(1.0,), error="relative").predicted_saved_bytes

    def accuracies(config: object) -> list[float]:
        out = []
        for seed in seeds:
            model, _ = finetune_copy(task, names, config, args.epochs, 64, seed, False)  # type: ignore[arg-type]
            out.append(accuracy(model, task.test_x, task.test_y))
            print(f"  seed {seed}: {out[-1]:.3f}", flush=True)
        return out

    def spread(values: list[float]) -> str:
        return f"{100 * statistics.fmean(values):.1f}% ({100 * min(values):.1f}-{100 * max(values):.1f})"

    print("plain, every layer", flush=True)
    rows = [["plain, every layer", "-", f"{len(names)}", "1", format_bytes(roomy), "1.00", "0", spread(accuracies(CompressionConfig("none")))]]
    for fraction in fractions:
        budget = int(roomy * fraction)
        plans = {measure: plan(task.base, calib, budget=budget, loss_fn=LOSS, error=measure) for measure in ("averaged", "relative")}
        for measure, chosen in plans.items():
            print(f"{fraction:g} of plain, {measure}: {chosen.table().splitlines()[-1 - len(chosen.notes)]}", flush=True)
            eps = "/".join(f"{c.eps:g}" if c.train else "-" for c in chosen.choices)
            rows.append([
                f"{fraction:g} x plain's kept ({format_bytes(budget)})", measure, str(len(chosen.trained)), eps,
                format_bytes(chosen.predicted_saved_bytes), f"{chosen.predicted_saved_bytes / roomy:.2f}",
                f"{chosen.total_error:.2f}", spread(accuracies(chosen)),
            ])
    header = ["budget", "error minimised", "layers trained", "eps per layer (- frozen)", "predicted kept", "kept / plain", "plan's total error", "test accuracy, mean (min-max)"]
    text = (
        "### Which error plan() should minimise (demo task: TinyMobileNet, digits 0-4 -> 5-9, every layer a candidate)\n\n"
        f"`python bench/plan_quality.py --seeds {args.seeds} --fractions {args.fractions}`; {machine(torch.device('cpu'))}\n\n"
        f"Adam lr 3e-3, batch 64, {args.epochs} epochs, seeds {args.seeds} (the batch order); plan() calibrated on the first batch "
        "(the averaged error over its 8 chunks of 8); budgets: bytes autograd keeps, as fractions of every layer at eps 1. "
        "Plan's total error: the sum, over the layers, of the measure it minimised (a frozen layer counts 1).\n\n"
        + markdown_table(header, rows)
    )
    publish("plan-quality", text, args.write)


if __name__ == "__main__":
    main()
