"""Compression against the exact levers, and what fit() picks, at the same device total.

    python bench/alternatives.py [--models resnet18,mobilenet_v2[,vit_b_16]] [--batch 8] [--size 96]
                                 [--optimizer adam|momentum] [--rounds 3] [--freeze-batchnorm] [--bf16-state]
                                 [--budgets 0.7,0.5,0.25,0.1] [--other-batches 20] [--key SECTION] [--write]

For each model (torchvision, random weights, 10 classes, train mode, every parameter trained;
``vit_b_16`` is built with ``image_size=--size``, which must be divisible by 16), one seeded
smooth batch (bilinear upsampling of 7x7 noise) and cross-entropy, on the CPU, with Adam (lr
1e-4) or SGD with momentum 0.9 (lr 1e-2), every variant is measured the way
:func:`actcomp.fit` measures its candidates (``actcomp.memory.fit._Calibration.measure``, on
copies of the model and the optimizer): the device total is resident bytes (weights, buffers,
optimizer state, the batch) + the allocator peak of one whole step (forward, backward, update:
CPU profiler allocation events) after a warm-up step has created the optimizer state; the
gradient error is ||g - g_plain|| / ||g_plain|| over every parameter on the same batch, with
its cosine, g_plain the plain full-batch gradient; the step time is the median of the timed
steps of the measurement and of ``--rounds`` rounds in which every variant of the model is
timed once after the other (``_Calibration.retime``: drift and load hit all alike).

Variants: plain; recompute of every block and region (what fit's recompute lever recomputes:
``auto_blocks`` and the runs of sibling modules of ``auto_regions``, e.g. resnet18's stem
``conv1+bn1+relu+maxpool``); micro-batching
with k = 2, 4, 8 (gradients accumulated; BatchNorm in train mode normalises each micro-batch
by its own statistics, so it is exact only with ``--freeze-batchnorm`` or without BatchNorm:
the error column says it); the optimizer step in backward, alone and with recompute of every
block and region, and that with the exact policies outside them (and with the blocks alone, without the regions) (``actcomp.EXACT_POLICIES``: bit
masks, uint8 pooling indices; exact) (and, with ``--bf16-state``, with its moments stored in bfloat16: approximate updates,
fit may then choose it too); compression alone
(``actcomp.compress(model, "all", method="hosvd", eps=0.9)``); hosvd 0.9 + 4 micro-batches;
and :func:`actcomp.fit` (defaults: max_error 0.1, eps 0.99/0.95/0.9, headroom 0.1) at 0.7, 0.5,
0.25 and 0.1 of plain's device total, each on a fresh copy of the model and optimizer, whose
FittedStep is then run for two real steps (the second one measured and checked against the
budget by the library) and measured on ``--other-batches`` (20) further batches. A fit that raises is a row saying so. To keep the run short, the fits
and the fixed variants measure in one shared calibration (fit builds its ``_Calibration`` from
the same model weights, optimizer settings and batch, so a combination measured once is not
measured again; the fits run first, so each fit's candidates are combinations fit itself
measured, possibly at an earlier budget's search); every row's figures then come from the
same measurement and the same interleaved timing rounds.

A compressed row is beaten by an uncompressed one at the same total (within 1 %) when that one
is exact (no gradient error: recompute, the step in backward, micro-batches without batch
statistics) and so has less error, or when it is both faster and closer; the text under the
tables says which, by name and figures.

The default run (resnet18 and mobilenet_v2 at batch 8, 96 px, Adam, 3 rounds) takes about 6
minutes on a quiet 2-core CPU, most of it in fit's searches at infeasible budgets (each
combination with compression is a few steps several times slower than plain); 128 px took
about 4 minutes for resnet18 alone and much longer for mobilenet_v2's searches, so the default
is 96 px. On a loaded host (other processes on the cores) it is several times slower. vit_b_16
is too slow for that budget: run it on its own, smaller
(``--models vit_b_16 --size 64 --batch 4 --key alternatives-vit_b_16``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's actcomp
import actcomp  # noqa: E402
import actcomp.memory.fit as fit_module  # noqa: E402
from actcomp.levers.recompute import auto_blocks  # noqa: E402
from actcomp.memory.fit import (  # noqa: E402
    EXACT_POLICIES, BudgetExceededError, FitChoice, _Applied, _approximate, _Calibration, _grads, _key, _recompute_sets,
)
from actcomp.memory.measure import format_bytes  # noqa: E402
from common import machine, markdown_table, publish  # noqa: E402

BUDGETS = (0.7, 0.5, 0.25, 0.1)


def smooth_batch(batch: int, size: int) -> Tensor:
    return F.interpolate(torch.randn(batch, 3, 7, 7), size=size, mode="bilinear", align_corners=False)


def build(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("vit"):
        if size % 16:
            raise SystemExit(f"{name} needs --size divisible by 16, got {size}")
        return torchvision.models.get_model(name, weights=None, num_classes=10, image_size=size).train()
    return torchvision.models.get_model(name, weights=None, num_classes=10).train()


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-4)
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)


def cosine(calibration: _Calibration, choice: FitChoice) -> float:
    """Cosine between the variant's gradient and plain's on the calibration batch (one more
    backward on a fresh copy, as ``measure`` computes the relative error)."""
    if choice.grad_error == 0.0:
        return 1.0

    model, optimizer = calibration._copies()
    probe = FitChoice(choice.micro_batches, choice.recompute, False, choice.compression, 0, 0, 0.0, 0.0)
    applied = _Applied(model, optimizer, probe, calibration.loss_fn, calibration.batch, calibration.frozen_batchnorm)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        applied.backward(calibration.batch)
    grads = _grads(model)
    applied.remove()
    dot = na = nb = 0.0
    for g, r in zip(grads, calibration.plain_gradient()):
        if g is None or r is None:
            continue
        g, r = g.double(), r.double()
        dot += float((g * r).sum())
        na += float(g.pow(2).sum())
        nb += float(r.pow(2).sum())
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")


@contextlib.contextmanager
def shared(calibration: _Calibration):
    """fit() measures in ``calibration`` (the same model weights, optimizer settings and batch)
    instead of a new one: a combination measured once is not measured again by the next fit."""
    def reuse(model, optimizer, batch, loss_fn, timing_steps, frozen_batchnorm):
        assert frozen_batchnorm == calibration.frozen_batchnorm and batch is calibration.batch
        return calibration

    saved = fit_module._Calibration
    fit_module._Calibration = reuse
    try:
        yield
    finally:
        fit_module._Calibration = saved


def run_fit(model: nn.Module, calibration: _Calibration, optimizer_kind: str, budget: int, args: argparse.Namespace) -> tuple[FitChoice | None, str]:
    """fit() on a fresh copy at ``budget``; its choice (None when it raised) and what to print."""
    copied = copy.deepcopy(model)
    optimizer = make_optimizer(copied, optimizer_kind)
    x, y = calibration.batch
    try:
        with shared(calibration):
            allow = ("micro_batches", "recompute", "step_in_backward", "exact_policies", "compression") + (("bf16_state",) if args.bf16_state else ())
            step = actcomp.fit(copied, optimizer, budget, calibration.batch, F.cross_entropy, freeze_batchnorm=args.freeze_batchnorm, allow=allow)
    except ValueError as error:
        if str(error).startswith("no combination"):  # fit's own answer to an infeasible budget
            found = re.search(r"the smallest total measured is (.*?\)): resident ([^ ]+ [^ ]+)", str(error))
            return None, f"infeasible: smallest total measured {found[1]}, resident {found[2]}" if found else f"infeasible: {str(error)[:110]}"
        head = "".join(traceback.format_exception(error)[-3:]).strip().replace("\n", " / ")
        print(f"fit raised at budget {format_bytes(budget)}: {head}", flush=True)
        return None, f"RAISED {type(error).__name__}: {str(error)[:110]}"
    except Exception as error:  # a library bug: reported, never hidden
        head = "".join(traceback.format_exception(error)[-3:]).strip().replace("\n", " / ")
        print(f"fit raised at budget {format_bytes(budget)}: {head}", flush=True)
        return None, f"RAISED {type(error).__name__}: {str(error)[:110]}"
    report = step.report
    notes = []
    try:
        for _ in range(2):  # Adam creates its state in the first step; the second is measured and checked
            step(x, y)
        if report.measured_total_bytes is not None:
            notes.append(f"real step {report.measured_total_bytes / budget:.2f} of budget")
        generator = torch.Generator().manual_seed(1000 + args.seed)  # other batches than the calibration one
        others = []
        for _ in range(args.other_batches):
            xb = F.interpolate(torch.randn(args.batch, 3, 7, 7, generator=generator), size=args.size, mode="bilinear", align_corners=False)
            others.append(step.measured(xb, torch.randint(0, 10, (args.batch,), generator=generator))[1])
        if others and None not in others:
            worst = max(others) / budget
            notes.append(f"{args.other_batches} other batches at most {worst:.2f} of budget" + (" (OVER)" if worst > 1 else ""))
    except BudgetExceededError as error:
        notes.append(f"REAL STEP OVER BUDGET: {str(error)[:120]}")
    except Exception as error:
        head = "".join(traceback.format_exception(error)[-3:]).strip().replace("\n", " / ")
        print(f"fitted step raised at budget {format_bytes(budget)}: {head}", flush=True)
        notes.append(f"FITTED STEP RAISED {type(error).__name__}: {str(error)[:110]}")
    step.remove()
    return report.chosen, f"{report.chosen.describe()} (fit's own figures: total {report.chosen.total_bytes / report.plain.total_bytes:.3f}, " \
        f"{report.chosen.step_ms / report.plain.step_ms:.2f}x; {'; '.join(notes) or 'no real-step figure'})"


def describe_compact(choice: FitChoice, blocks: tuple[str, ...]) -> str:
    text = choice.describe()
    every = FitChoice(1, blocks, False, None, 0, 0, 0.0, 0.0).describe()  # "recompute 8 blocks + 1 region"
    return text.replace(every, "recompute every block and region") if blocks and choice.recompute == blocks else text


def one_model(name: str, args: argparse.Namespace) -> tuple[str, list[str]]:
    torch.manual_seed(args.seed)  # the same batch in every run
    x = smooth_batch(args.batch, args.size)
    y = torch.randint(0, 10, (args.batch,))
    model = build(name, args.size)
    optimizer = make_optimizer(model, args.optimizer)
    calibration = _Calibration(model, optimizer, (x, y), F.cross_entropy, timing_steps=1, frozen_batchnorm=args.freeze_batchnorm)
    blocks = _recompute_sets(calibration)[-1]  # fit's recompute lever at its largest: every block and region
    only_blocks = tuple(auto_blocks(model))
    every = f"every block and region ({len(only_blocks)} + {len(blocks) - len(only_blocks)})"
    hosvd = actcomp.CompressionConfig("hosvd", 0.9)
    fixed: list[tuple[str, tuple]] = [
        ("plain", (1, (), False, None)),
        (f"recompute {every}", (1, blocks, False, None)),
        *[(f"{k} micro-batches", (k, (), False, None)) for k in (2, 4, 8) if k <= args.batch],
        ("step in backward", (1, (), True, None)),
        ("recompute every block and region + step in backward", (1, blocks, True, None)),
        *([("recompute every block, no region + step in backward + exact policies", (1, only_blocks, True, EXACT_POLICIES))]
          if only_blocks != blocks else []),
        ("recompute every block and region + step in backward + exact policies", (1, blocks, True, EXACT_POLICIES)),
        *([("step in backward, state bf16 (approximate)", (1, (), True, None, torch.bfloat16)),
           ("recompute every block and region + step in backward, state bf16 + exact policies", (1, blocks, True, EXACT_POLICIES, torch.bfloat16))]
          if args.bf16_state else []),
        ("hosvd eps 0.9", (1, (), False, hosvd)),
        ("hosvd eps 0.9 + 4 micro-batches", (4, (), False, hosvd)),
    ]
    started = time.perf_counter()
    plain_total = calibration.measure(1, (), False, None).total_bytes
    fit_rows: list[tuple[str, FitChoice | None, str]] = []
    for fraction in args.budgets:  # first, so that each fit's candidates are what fit itself measured
        budget = int(plain_total * fraction)
        chosen, text = run_fit(model, calibration, args.optimizer, budget, args)
        fit_rows.append((f"fit at {fraction:g} x plain ({format_bytes(budget)})", chosen, text))
        print(f"{name}: fit {fraction:g}: {text} [{time.perf_counter() - started:.0f} s]", flush=True)
    rows: dict[str, FitChoice] = {}
    for label, key in fixed:
        rows[label] = calibration.measure(*key)
        print(f"{name}: {label}: total {format_bytes(rows[label].total_bytes)}, {rows[label].step_ms:.0f} ms, error {rows[label].grad_error:.3g} [{time.perf_counter() - started:.0f} s]", flush=True)
    timed = list({_key(c): c for c in [*rows.values(), *(c for _, c, _ in fit_rows if c is not None)]}.values())
    calibration.retime(timed, args.rounds)
    latest = {k: calibration.measured[k] for k in map(_key, timed)}
    rows = {label: latest[_key(c)] for label, c in rows.items()}
    fit_rows = [(label, None if c is None else latest[_key(c)], text) for label, c, text in fit_rows]
    plain = rows["plain"]
    cosines = {label: cosine(calibration, c) for label, c in rows.items()}

    def cells(label: str, c: FitChoice, chosen: str) -> list[str]:
        cos = cosines.get(label)
        if cos is None:
            cos = cosine(calibration, c)
        return [
            label, format_bytes(c.total_bytes), f"**{c.total_bytes / plain.total_bytes:.3f}**", f"{c.step_ms:.0f}",
            f"**{c.step_ms / plain.step_ms:.2f}x**", f"{c.grad_error:.3g}", f"{cos:.4f}", chosen,
        ]

    table = [cells(label, c, "") for label, c in rows.items()]
    for label, c, text in fit_rows:
        table.append(cells(label, c, text) if c is not None else [label, "", "", "", "", "", "", text])
    # where an exact lever beats compression: the same total (within 1 %) at less time or less
    # error; an inexact uncompressed row (micro-batches through train-mode BatchNorm) must have both
    findings = []
    candidates = list(rows.items()) + [(f"{label}, which chose {describe_compact(c, blocks)}", c) for label, c, _ in fit_rows if c is not None]
    seen = set()

    def figures(c: FitChoice) -> str:
        return f"{c.total_bytes / plain.total_bytes:.3f} of plain, {c.step_ms / plain.step_ms:.2f}x, error {c.grad_error:.3g}"

    for label, c in candidates:
        if not _approximate(c.compression) or _key(c) in seen:
            continue
        seen.add(_key(c))
        beaten, inexact = [], []
        for other_label, o in rows.items():
            if _approximate(o.compression) or o.total_bytes > c.total_bytes * 1.01:
                continue
            faster, closer = o.step_ms < c.step_ms, o.grad_error < c.grad_error
            if o.grad_error == 0.0:
                what = "exact and faster" if faster else f"exact, {o.step_ms / c.step_ms:.2f}x its time"
                beaten.append(f"{other_label} ({figures(o)}: {what})")
            elif faster and closer:
                beaten.append(f"{other_label} ({figures(o)}: faster and closer, though not exact)")
            else:
                inexact.append(other_label)
        head = f"{label} ({figures(c)})"
        if beaten:
            findings.append(f"- {name}: **an uncompressed lever beats {head}**: " + "; ".join(beaten) + ".")
        else:
            findings.append(f"- {name}: nothing uncompressed at its total beats {head}" + (
                f" ({', '.join(inexact)} reach it only with a larger gradient error or more time)" if inexact else ": no uncompressed variant reaches that total") + ".")
    elapsed = time.perf_counter() - started
    resident = calibration.resident
    title = (
        f"### {name}, batch {args.batch}, {args.size}x{args.size}, {args.optimizer}\n\n"
        f"Resident {format_bytes(resident)} (weights {format_bytes(calibration.weights)}, buffers {format_bytes(calibration.buffers)}, "
        f"optimizer state {format_bytes(calibration.state)}, batch {format_bytes(calibration.batch_bytes)}); plain's device total "
        f"{format_bytes(plain.total_bytes)}, step {plain.step_ms:.0f} ms; {elapsed:.0f} s for this model.\n\n"
    )
    header = ["variant", "device total", "total/plain", "step ms", "time/plain", "grad rel. error", "grad cosine", "fit chose"]
    return title + markdown_table(header, table) + "\n", findings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--optimizer", choices=["adam", "momentum"], default="adam")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--freeze-batchnorm", action="store_true", help="BatchNorm on running statistics (fit's freeze_batchnorm=True)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch (default 0)")
    parser.add_argument("--budgets", type=lambda text: () if text == "none" else tuple(float(f) for f in text.split(",")), default=BUDGETS,
                        help="fractions of plain's device total fit is run at (default 0.7,0.5,0.25,0.1; none: no fit rows)")
    parser.add_argument("--other-batches", type=int, default=20, help="batches besides the calibration one each fitted step is measured on (default 20)")
    parser.add_argument("--bf16-state", action="store_true", help="let fit store the optimizer moments in bfloat16 (allow 'bf16_state'; approximate)")
    parser.add_argument("--key", default="alternatives", help="BENCHMARKS.md section (default alternatives)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu")
    parts, findings = [], []
    for name in args.models.split(","):
        text, found = one_model(name, args)
        print(text, flush=True)
        parts.append(text)
        findings += found
    command = (
        f"python bench/alternatives.py --models {args.models} --batch {args.batch} --size {args.size} --optimizer {args.optimizer} "
        f"--rounds {args.rounds}{' --freeze-batchnorm' if args.freeze_batchnorm else ''}{' --bf16-state' if args.bf16_state else ''}"
        f"{f' --other-batches {args.other_batches}' if args.other_batches != 20 else ''}"
        f"{' --budgets ' + ','.join(f'{b:g}' for b in args.budgets) if args.budgets != BUDGETS else ''}{' --key ' + args.key if args.key != 'alternatives' else ''} --write"
    )
    text = (
        f"## Alternatives to compression at the same device total, {device.type}\n\n"
        f"Machine: {machine(device)}. Command: `{command}`. Every parameter trained, one seeded batch, "
        f"BatchNorm {'frozen (running statistics)' if args.freeze_batchnorm else 'in train mode (micro-batches see their own statistics)'}. "
        "Every row measured as fit() measures its candidates (`_Calibration.measure` on copies): device total = resident "
        "(weights, buffers, optimizer state, batch) + allocator peak of one whole step after a warm-up; time: median step, "
        f"variants alternating over {args.rounds} rounds; gradient error ||g - g_plain|| / ||g_plain|| and cosine on the same "
        "batch. Fit rows: actcomp.fit at that fraction of plain's total on a fresh copy, its choice measured with the others; "
        "the last column gives fit's own figures (at fit time, before the last timing rounds), the first real step's measured total against the budget "
        f"and the largest measured total over {args.other_batches} other batches (`FittedStep.measured`) against it; fits and fixed rows share one calibration (a combination is measured once), fits first.\n\n"
        + "\n".join(parts)
        + "\nWhere an exact lever beats compression (an uncompressed row at the same total, within 1 %, that is exact, "
        "or faster and closer):\n\n"
        + "\n".join(findings) + "\n"
    )
    publish(args.key, text, args.write)


if __name__ == "__main__":
    main()
