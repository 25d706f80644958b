"""Learning quality at equal memory: test accuracy over seeds against the device total of a step.

    python bench/quality.py [--seeds 0,1,2] [--epochs 4] [--variants NAME,...] [--task digits|tokens] [--write]

The demo's transfer task (``--task digits``: a TinyMobileNet with BatchNorm, pretrained on
32x32 digits 0-4, every layer fine-tuned on digits 5-9; ``--task tokens``: the token demo's
TinyViT, 8x8 digits cut into 2x2 patches as 16 tokens, LayerNorm, attention and GELU, pretrained
20 epochs on 0-4, every layer fine-tuned on 5-9) is
fine-tuned with Adam (lr 3e-3, batch 64) from the same pretrained weights by each variant, for
each seed (the seed sets the pretraining, the split and the batch order). Variants: plain
autograd, micro-batching (k chunks per batch, gradients accumulated: exact), recompute
(checkpointing every top-level block), and each compression method at several eps, alone and on
micro-batches. For every variant: test accuracy per seed (mean, min, max), the bytes autograd
keeps in one step and the device total of one step (weights + buffers + Adam state + the
batch + the allocator peak of forward+backward, measured with :func:`actcomp.measure` on the
micro-batch the variant runs), both against plain's. The variants of one seed run one after
the other from the same pretrained model, so the seeds' spread is what a user would see.
"""

from __future__ import annotations

import argparse
import json
import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
import actcomp  # noqa: E402
import actcomp.methods.base  # noqa: E402
import actcomp.methods.hosvd_unbiased  # noqa: E402
from actcomp.app.data import digits, split  # noqa: E402
from actcomp.app.demo import Task, accuracy, make_task, train  # noqa: E402
from actcomp.app.demo_tokens import TinyViT  # noqa: E402
from actcomp.memory.error import gradient_error_stats, per_tensor_error_stats  # noqa: E402
from common import machine, markdown_table, publish  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One way to train: compression settings (None: plain), micro-batches per batch, recompute."""

    name: str
    config: Callable[[], actcomp.CompressionConfig] | None = None
    micro_batches: int = 1
    recompute: bool = False
    optimizer: str = "adam"  # "adam" (lr 3e-3) or "momentum" (SGD, momentum 0.9, lr 0.03)


def hosvd(eps: float, **settings) -> Callable[[], actcomp.CompressionConfig]:
    return lambda: actcomp.CompressionConfig("hosvd", eps, **settings)


def method(name: str, eps: float) -> Callable[[], actcomp.CompressionConfig]:
    return lambda: actcomp.CompressionConfig(name, eps)


@actcomp.register_method
class BatchModeKept(actcomp.Compressor):
    """An experiment of this benchmark (not a library method): hosvd with the batch mode kept
    whole (its threshold 1.0) and eps on the other modes, to test whether truncating the batch
    mode is what costs accuracy."""

    name = "bench_hosvd_batch_kept"

    def compress(self, x: Tensor, layout: actcomp.InputLayout, state: object) -> actcomp.Tucker:
        return actcomp.hosvd(x, (1.0,) + (self.config.eps,) * (x.ndim - 1))

    def ranks(self, factors: actcomp.Tucker) -> tuple[int, ...]:  # type: ignore[override]
        return factors.ranks


def check_modes(modes: object) -> str:
    if not isinstance(modes, str) or not modes or set(modes) - set("bcs"):
        raise ValueError(f"truncate must be letters of 'bcs' (batch, channel, spatial), got {modes!r}")
    return modes


@actcomp.register_method
class ModesTruncated(actcomp.Compressor):
    """An experiment of this benchmark (not a library method): hosvd truncating at eps only the
    modes named by ``truncate`` (b: the sample modes, c: channels, s: spatial modes), the other
    modes kept whole (threshold 1.0), to find which mode's truncation costs accuracy."""

    name = "bench_hosvd_modes"
    own_settings = (actcomp.methods.base.Setting("truncate", "bcs", check_modes, "modes hosvd truncates"),)

    def compress(self, x: Tensor, layout: actcomp.InputLayout, state: object) -> actcomp.Tucker:
        kinds = "bc" + "s" * layout.spatial if layout.spatial else "b" * (x.ndim - 1) + "c"
        eps = tuple(self.config.eps if kind in self.config.truncate else 1.0 for kind in kinds)
        return actcomp.hosvd(x, eps)

    def ranks(self, factors: actcomp.Tucker) -> tuple[int, ...]:  # type: ignore[override]
        return factors.ranks


@actcomp.register_method
class UnbiasedTruncatedNeighbours(actcomp.methods.hosvd_unbiased.UnbiasedHOSVD):
    """An experiment of this benchmark (not a library method): hosvd_unbiased whose BatchNorm
    factors are truncated (hosvd's; the library's default draws them too), to measure what that
    choice is worth."""

    name = "bench_hosvd_unbiased_truncated_bn"
    truncated_neighbours = True


def modes(eps: float, truncate: str) -> Callable[[], actcomp.CompressionConfig]:
    return lambda: actcomp.CompressionConfig("bench_hosvd_modes", eps, truncate=truncate)


VARIANTS = {  # names hold no comma: --variants is a comma-separated list
    v.name: v
    for v in [
        Variant("plain"),
        Variant("plain + 4 micro-batches", micro_batches=4),
        Variant("plain + 16 micro-batches", micro_batches=16),
        Variant("hosvd 0.9", hosvd(0.9)),
        Variant("hosvd 0.95", hosvd(0.95)),
        Variant("hosvd 0.99", hosvd(0.99)),
        Variant("svd 0.9", method("svd", 0.9)),
        Variant("asi 0.9", method("asi", 0.9)),
        Variant("hosvd 0.9 + 4 micro-batches", hosvd(0.9), micro_batches=4),
        Variant("hosvd 0.9 + 16 micro-batches", hosvd(0.9), micro_batches=16),
        Variant("hosvd 0.9 (batch mode kept)", method("bench_hosvd_batch_kept", 0.9)),
        Variant("hosvd 0.8 (batch mode kept)", method("bench_hosvd_batch_kept", 0.8)),
        Variant("hosvd 0.9 batch mode only", modes(0.9, "b")),
        Variant("hosvd 0.9 channel mode only", modes(0.9, "c")),
        Variant("hosvd 0.9 spatial modes only", modes(0.9, "s")),
        Variant("plain (SGD momentum)", optimizer="momentum"),
        Variant("hosvd 0.9 (SGD momentum)", hosvd(0.9), optimizer="momentum"),
        Variant("hosvd_unbiased 0.9", method("hosvd_unbiased", 0.9)),
        Variant("hosvd_unbiased 0.95", method("hosvd_unbiased", 0.95)),
        Variant("hosvd_unbiased 0.8", method("hosvd_unbiased", 0.8)),
        Variant("svd_unbiased 0.9", method("svd_unbiased", 0.9)),
        Variant("hosvd_unbiased 0.9 + 4 micro-batches", method("hosvd_unbiased", 0.9), micro_batches=4),
        Variant("hosvd_unbiased 0.9 + 16 micro-batches", method("hosvd_unbiased", 0.9), micro_batches=16),
        Variant("hosvd_unbiased 0.9 (SGD momentum)", method("hosvd_unbiased", 0.9), optimizer="momentum"),
        Variant("hosvd_unbiased 0.92", method("hosvd_unbiased", 0.92)),
        Variant("hosvd_unbiased 0.93", method("hosvd_unbiased", 0.93)),
        *(Variant(f"hosvd_unbiased {eps} (truncated BatchNorm)", method("bench_hosvd_unbiased_truncated_bn", eps)) for eps in (0.9, 0.92, 0.93, 0.95)),
    ]
}


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "momentum":
        return torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=3e-3)


def trainable_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, micro_batches: int) -> float:
    """One Adam step on (x, y), the batch split into ``micro_batches`` chunks whose gradients
    accumulate to the full batch's mean-loss gradient (each chunk's loss weighted by its size)."""
    optimizer.zero_grad()
    total = 0.0
    for xc, yc in zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)):
        if len(yc) == 0:
            continue
        loss = nn.functional.cross_entropy(model(xc), yc) * (len(yc) / len(y))
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


def prepare(base: nn.Module, variant: Variant, sample: Tensor) -> nn.Module:
    model = copy.deepcopy(base)
    model.requires_grad_(True)
    if variant.config is not None:
        actcomp.compress(model, "all", config=variant.config(), sample=sample)
    return model


def device_total(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> tuple[int, int, int]:
    """(bytes autograd keeps, allocator peak of forward+backward, device total) of one step on
    (x, y): the total is weights + buffers + optimizer state + the batch + the peak."""
    report = actcomp.measure(model, x, y, nn.functional.cross_entropy, optimizer=optimizer, vanilla=False)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    batch = x.numel() * x.element_size() + y.numel() * y.element_size()
    peak = report.peak_bytes or 0
    return report.saved_bytes, peak, report.weights_bytes + buffers + report.optimizer_state_bytes + batch + peak


def gradient(model: nn.Module, x: Tensor, y: Tensor, micro_batches: int) -> list[Tensor]:
    """The gradient of the mean loss on (x, y) as the variant computes it (no update)."""
    model.zero_grad(set_to_none=True)
    for xc, yc in zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)):
        if len(yc):
            (nn.functional.cross_entropy(model(xc), yc) * (len(yc) / len(y))).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def relative_error(grads: list[Tensor], reference: list[Tensor]) -> float:
    """||g - g_plain|| / ||g_plain|| over every parameter (what fit's max_error bounds)."""
    num = sum(float((g - r).double().pow(2).sum()) for g, r in zip(grads, reference))
    return (num / sum(float(r.double().pow(2).sum()) for r in reference)) ** 0.5


def _flat(grads: list[Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1).double() for g in grads])


def candidate_measures(estimates: list[list[Tensor]], exact: list[list[Tensor]], names: list[str]) -> dict[str, float]:
    """Candidate predictors of the accuracy a variant loses, from its gradients over n batches
    and the exact ones of the same batches (same weights). ``error``: mean_b ||e_b|| / ||g_b||;
    ``bias``, ``spread``, ``noise``, ``learning_error``: gradient_error_stats; ``bias_noise``:
    bias / noise; ``cos``: 1 - mean_b cos(g~_b, g_b); ``mean_cos``: 1 - cos(mean g~, mean g);
    ``layer_error``: median over weight tensors of mean_b ||e_b,l|| / ||g_b,l||; ``layer_bias``:
    median over weight tensors of their bias; ``layer_mean_error``: median over weight tensors
    of ||mean e_l|| / ||mean g_l||; ``layer_mean_cos``: median over weight tensors of
    1 - cos(mean g~_l, mean g_l) (blind to a per-layer scale, which Adam normalises away); ``adam``: ||d~ - d|| / ||d|| with d = mean g / sqrt(mean g^2)
    per coordinate (the direction Adam steps in once its moments have averaged the batches);
    ``sign``: the |mean g|-weighted share of coordinates where mean g~ and mean g differ in sign."""
    est = torch.stack([_flat(g) for g in estimates])
    ref = torch.stack([_flat(g) for g in exact])
    err = est - ref
    stats = gradient_error_stats(estimates, exact)
    cos = torch.nn.functional.cosine_similarity(est, ref, dim=1)
    mean_est, mean_ref = est.mean(0), ref.mean(0)
    d_est = mean_est / est.pow(2).mean(0).sqrt().clamp_min(1e-30)
    d_ref = mean_ref / ref.pow(2).mean(0).sqrt().clamp_min(1e-30)
    layers = [i for i, name in enumerate(names) if name.endswith("weight")]
    per_tensor = per_tensor_error_stats(estimates, exact)

    def layer_error(i: int) -> float:
        return statistics.mean(float((e[i] - r[i]).norm() / r[i].norm().clamp_min(1e-30)) for e, r in zip(estimates, exact))

    def layer_mean_cos(i: int) -> float:
        me = sum(e[i] for e in estimates).reshape(-1).double()
        mr = sum(r[i] for r in exact).reshape(-1).double()
        return float(1 - torch.nn.functional.cosine_similarity(me, mr, dim=0))

    def layer_mean_error(i: int) -> float:
        me = sum(e[i] - r[i] for e, r in zip(estimates, exact)) / len(exact)
        mr = sum(r[i] for r in exact) / len(exact)
        return float(me.norm() / mr.norm().clamp_min(1e-30))

    return dict(
        error=float((err.norm(dim=1) / ref.norm(dim=1)).mean()), bias=stats.bias, spread=stats.spread, noise=stats.noise,
        learning_error=stats.learning_error(), bias_noise=stats.bias / stats.noise if stats.noise > 0 else float("nan"), cos=float(1 - cos.mean()),
        mean_cos=float(1 - torch.nn.functional.cosine_similarity(mean_est, mean_ref, dim=0)),
        layer_error=statistics.median(layer_error(i) for i in layers),
        layer_bias=statistics.median(per_tensor[i].bias for i in layers if per_tensor[i] is not None),
        layer_mean_error=statistics.median(layer_mean_error(i) for i in layers),
        layer_mean_cos=statistics.median(layer_mean_cos(i) for i in layers),
        adam=float((d_est - d_ref).norm() / d_ref.norm()),
        sign=float(((mean_est.sign() != mean_ref.sign()) * mean_ref.abs()).sum() / mean_ref.abs().sum()),
    )


def gradient_errors(base: nn.Module, model: nn.Module, batches: list[tuple[Tensor, Tensor]], micro_batches: int) -> dict[str, float]:
    """Measures of the variant's gradients from the same (pretrained) weights, in three settings.

    Over ``batches`` (distinct batches, the variant on a fresh copy each): ``grad_error``: mean
    per-batch ||g - g_plain|| / ||g_plain|| against plain on the full batch (fit's measure);
    ``error_same``: the same against plain on the same micro-batches (the exact counterpart:
    BatchNorm sees the same chunks, so only compression's error is left); the
    :func:`candidate_measures` against that counterpart (no prefix). ``rep_``: the candidates
    over the first batch taken len(batches) times by one copy (a sampled method draws anew each
    time; what one calibration batch can give). ``chunk_``: the candidates over the first batch
    split into len(batches) chunks, each a batch of its own (what fit could do with one batch)."""
    errors, estimates, exact = [], [], []
    for x, y in batches:
        plain = gradient(copy.deepcopy(base).requires_grad_(True), x, y, 1)
        same = plain if micro_batches == 1 else gradient(copy.deepcopy(base).requires_grad_(True), x, y, micro_batches)
        grads = gradient(copy.deepcopy(model), x, y, micro_batches)
        errors.append(relative_error(grads, plain))
        estimates.append(grads)
        exact.append(same)
    names = [name for name, _ in model.named_parameters()]
    result = dict(grad_error=statistics.mean(errors), error_same=candidate_measures(estimates, exact, names)["error"])
    result.update(candidate_measures(estimates, exact, names))
    x, y = batches[0]
    same = gradient(copy.deepcopy(base).requires_grad_(True), x, y, micro_batches)
    repeated = copy.deepcopy(model)
    rep = candidate_measures([gradient(repeated, x, y, micro_batches) for _ in batches], [same] * len(batches), names)
    result.update({f"rep_{k}": v for k, v in rep.items()})
    chunks = list(zip(x.tensor_split(len(batches)), y.tensor_split(len(batches))))
    chunked = copy.deepcopy(model)
    chunk = candidate_measures(
        [gradient(chunked, xc, yc, micro_batches) for xc, yc in chunks],
        [gradient(copy.deepcopy(base).requires_grad_(True), xc, yc, micro_batches) for xc, yc in chunks], names,
    )
    result.update({f"chunk_{k}": v for k, v in chunk.items()})
    return result


MEASURES = {  # key of gradient_errors' result: column title
    "grad_error": "gradient error", "error_same": "error vs same chunks", "bias": "bias", "spread": "spread",
    "noise": "noise", "learning_error": "learning error", "layer_bias": "median layer bias",
}


def make_token_task(seed: int) -> Task:
    """The token demo's transfer task: a TinyViT pretrained (20 epochs, as the demo) on 8x8
    digits 0-4 as 2x2-patch tokens, a fresh head, data of digits 5-9 (70/30 split by seed)."""
    torch.manual_seed(seed)
    source_x, source_y = digits(classes=(0, 1, 2, 3, 4), size=8)
    train_x, train_y, test_x, test_y = split(*digits(classes=(5, 6, 7, 8, 9), size=8), test_fraction=0.3, seed=seed)
    base = TinyViT(num_classes=5)
    train(base, source_x, source_y, 20, 64, 3e-3, seed, "pretrain TinyViT on digits 0-4", False)
    base.head.reset_parameters()
    return Task(base, train_x, train_y, test_x, test_y)


TASKS = {"digits": lambda seed: make_task(seed=seed, progress=False), "tokens": make_token_task}
TITLES = {
    "digits": "demo task: TinyMobileNet, digits 0-4 -> 5-9, every layer trained",
    "tokens": "token task: TinyViT on 2x2-patch tokens, digits 0-4 -> 5-9, every layer trained",
}


def run_seed(
    seed: int, variants: list[Variant], epochs: int, batch_size: int, measure_only: bool = False, save: Callable[[dict], None] | None = None,
    task_name: str = "digits",
) -> dict[str, dict[str, float]]:
    task = TASKS[task_name](seed)
    results = {}
    probes = [(task.train_x[i : i + batch_size], task.train_y[i : i + batch_size]) for i in range(0, 8 * batch_size, batch_size)]
    for variant in variants:
        torch.manual_seed(seed)
        model = prepare(task.base, variant, task.train_x[:2])
        measures = gradient_errors(task.base, model, probes, variant.micro_batches)
        if measure_only:
            results[variant.name] = measures
            print(f"seed {seed} {variant.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in measures.items() if isinstance(v, float)), flush=True)
            continue
        optimizer = make_optimizer(model, variant.optimizer)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        start = time.perf_counter()
        steps = 0
        for _ in range(epochs):
            order = torch.randperm(len(task.train_y), generator=generator)
            for begin in range(0, len(order), batch_size):
                index = order[begin : begin + batch_size]
                trainable_step(model, optimizer, task.train_x[index], task.train_y[index], variant.micro_batches)
                steps += 1
        seconds = time.perf_counter() - start
        chunk = max(1, batch_size // variant.micro_batches)
        saved, peak, total = device_total(model, optimizer, task.train_x[:chunk], task.train_y[:chunk])
        results[variant.name] = dict(
            accuracy=accuracy(model, task.test_x, task.test_y), saved=saved, peak=peak, total=total, step_ms=1e3 * seconds / steps,
            **measures,
        )
        if save is not None:
            save(results)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in measures.items() if isinstance(v, float))
        print(f"seed {seed} {variant.name}: {100 * results[variant.name]['accuracy']:.1f}%, total {total / 2**20:.2f} MiB, {shown}", flush=True)
    return results


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n of ``values``, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else float("nan")


SETTINGS = {"": "8 distinct batches", "rep_": "1 batch, 8 draws", "chunk_": "1 batch in 8 chunks"}
CANDIDATES = {  # no "|" in a title: it would split the markdown cell
    "grad_error": "fit's max_error measure: norm(g~_b - g_plain,b) / norm(g_plain,b), plain on the full batch",
    "error": "per-batch relative error norm(e_b) / norm(g_b)", "bias": "bias (gradient_error_stats)", "spread": "spread",
    "learning_error": "learning error sqrt(10 bias^2 + spread^2) / noise", "bias_noise": "bias / noise",
    "cos": "1 - mean cosine(g~_b, g_b)", "mean_cos": "1 - cosine of the mean gradients", "layer_error": "median layer relative error",
    "layer_bias": "median layer bias", "layer_mean_error": "median layer error of the mean gradient",
    "layer_mean_cos": "median layer 1 - cosine of the mean gradients",
    "adam": "error of Adam's direction mean g / sqrt(mean g^2)", "sign": "abs(g)-weighted sign disagreement of the mean gradients",
}


def correlation_table(args: argparse.Namespace, variants: list[Variant], per_seed: list[dict]) -> str:
    """Spearman's correlation, over the compressed variants, between the accuracy each loses
    (plain's minus its, per seed, mean over the seeds that trained it) and each measure (mean
    over the seeds that measured it), in each measuring setting; the variants' losses below."""
    losses, values = {}, {}
    for v in variants:
        if v.config is None:
            continue
        lost = [100 * (r["plain"]["accuracy"] - r[v.name]["accuracy"]) for r in per_seed if "accuracy" in r.get(v.name, {}) and "plain" in r]
        if lost:
            losses[v.name] = statistics.mean(lost)
            measured: dict[str, list[float]] = {}
            for r in per_seed:
                for k, x in r.get(v.name, {}).items():
                    if isinstance(x, (int, float)) and math.isfinite(x):
                        measured.setdefault(k, []).append(x)
            values[v.name] = {k: statistics.mean(xs) for k, xs in measured.items()}
    rows = []
    for key, title in CANDIDATES.items():
        cells = []
        for prefix in SETTINGS:
            names = [n for n in losses if prefix + key in values[n]]
            if key == "grad_error" and prefix:  # measured on distinct batches only
                names = []
            cells.append(f"{spearman([values[n][prefix + key] for n in names], [losses[n] for n in names]):+.2f} ({len(names)})" if len(names) >= 5 else "-")
        rows.append([title, *cells])
    loss_rows = [[n, f"{losses[n]:.1f}", *(f"{values[n][k]:.3g}" if k in values[n] else "-" for k in ("grad_error", "layer_bias", "rep_layer_bias", "chunk_layer_bias"))] for n in sorted(losses, key=losses.get)]
    command = f"python bench/quality.py --from-json FILES --correlate --variants '{args.variants}'"
    return (
        f"### Which gradient measure predicts the accuracy lost ({TITLES[args.task]})\n\n`{command}` on the files of the runs above "
        f"(seeds {args.seeds}); {len(losses)} compressed variants. Spearman's rank correlation between a measure taken from the "
        "pretrained weights (against plain on the same micro-batches) and the test accuracy the variant loses against plain "
        "after fine-tuning (points, mean over the seeds that trained it); 1 = the measure orders the variants exactly as the "
        "accuracy loss does; in brackets the number of variants with that measure (the 1-batch settings were added after seed 0's "
        "run: the variants trained on seed 0 only have none). Settings: 8 distinct batches of 64; the first batch 8 times (a sampled method draws anew each "
        "time: what one calibration batch gives); the first batch split into 8 chunks of 8, each a batch of its own.\n\n"
        + markdown_table(["measure", *SETTINGS.values()], rows)
        + "\n\n" + markdown_table(["variant", "accuracy lost (points)", "fit's max_error measure", "median layer bias", "same, 1 batch 8 draws", "same, 1 batch in 8 chunks"], loss_rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--task", choices=sorted(TASKS), default="digits", help="digits: the demo's CNN (default); tokens: the token demo's ViT")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    parser.add_argument("--section", default="quality", help="BENCHMARKS.md section to write (default quality)")
    parser.add_argument("--json", help="also save every seed's measurements to this file")
    parser.add_argument("--from-json", help="comma-separated files saved by --json: make the table from them (the seeds of all), run nothing")
    parser.add_argument("--measure-only", action="store_true", help="only the gradient measures (no training); with --json")
    parser.add_argument("--correlate", action="store_true", help="with --from-json: rank correlation of each gradient measure with the accuracy lost")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    variants = [VARIANTS[n] for n in names]
    if args.measure_only and not args.json:
        raise SystemExit("--measure-only needs --json (the measures are merged into a table with --from-json)")
    per_seed = []
    if args.from_json:
        loaded: dict[str, dict] = {}
        for path in args.from_json.split(","):
            for seed, results in json.loads(Path(path).read_text()).items():
                for name, values in results.items():  # later files add to (or replace) earlier measures
                    loaded.setdefault(seed, {}).setdefault(name, {}).update(values)
        seeds = sorted(int(s) for s in loaded)
        per_seed = [loaded[str(seed)] for seed in seeds]
        args.seeds = ",".join(map(str, seeds))
    for seed in [] if args.from_json else seeds:

        def save(results: dict, seed: int = seed) -> None:  # after every variant: a stopped run keeps what it measured
            if args.json:
                Path(args.json).write_text(json.dumps({**dict(zip(seeds, per_seed)), seed: results}, indent=1))

        per_seed.append(run_seed(seed, variants, args.epochs, args.batch_size, args.measure_only, save, args.task))
        save(per_seed[-1])
    if args.measure_only:
        return
    if args.correlate:
        publish(args.section, correlation_table(args, variants, per_seed), args.write)
        return
    plain = per_seed[0].get("plain")
    rows = []
    for variant in variants:
        accs = [100 * r[variant.name]["accuracy"] for r in per_seed]
        first = per_seed[0][variant.name]
        ratio = lambda key: f"{first[key] / plain[key]:.3f}" if plain and plain[key] else "-"  # noqa: E731
        rows.append([
            variant.name,
            f"{statistics.mean(accs):.1f}% ({min(accs):.1f}-{max(accs):.1f})",
            ratio("saved"), ratio("peak"), ratio("total"), f"{first['total'] / 2**20:.2f} MiB",
            f"{statistics.median(r[variant.name]['step_ms'] for r in per_seed):.0f}",
            *(f"{statistics.mean(r[variant.name][key] for r in per_seed):.3f}" for key in MEASURES),
        ])
    header = ["variant", "test accuracy, mean (min-max)", "saved / plain", "peak / plain", "total / plain", "device total", "ms/step", *MEASURES.values()]
    command = f"python bench/quality.py --seeds {args.seeds} --epochs {args.epochs} --batch-size {args.batch_size}"
    if args.task != "digits":
        command += f" --task {args.task}"
    if names != list(VARIANTS):
        command += f" --variants '{args.variants}'"
    text = (
        f"### Learning quality at equal memory ({TITLES[args.task]})\n\n`{command}`; {machine(torch.device('cpu'))}\n\n"
        f"Adam lr 3e-3 (SGD momentum 0.9 lr 0.03 where named), batch {args.batch_size}, {args.epochs} epochs, seeds "
        f"{args.seeds}; memory of one step on the micro-batch the variant runs (device total = weights + buffers + "
        "optimizer state + batch + allocator peak; ratios from seed 0). Gradient measures from the pretrained weights over "
        "8 batches, mean over the seeds: gradient error ||g - g_plain|| / ||g_plain|| per batch against plain on the full "
        "batch (fit's max_error measure); error vs same chunks: against plain on the same micro-batches; bias, spread, "
        "noise (`actcomp.memory.error.gradient_error_stats`, against plain on the same chunks, relative to the mean "
        "gradient): the error left after averaging over the batches (sampling error of the mean removed), its "
        "batch-to-batch part, plain's own minibatch noise; learning error sqrt(10 bias^2 + spread^2) / noise; median "
        "layer bias: the bias per weight tensor (each layer against its own gradient), median over the layers.\n\n"
        + markdown_table(header, rows)
    )
    publish(args.section, text, args.write)


if __name__ == "__main__":
    main()
