"""The demo: transfer a small CNN to new classes under a memory budget, offline.

A TinyMobileNet is pretrained on scikit-learn's digits 0-4 (upsampled to 32x32), then its last
N Conv/Linear layers are fine-tuned on digits 5-9 from the same starting point: with plain
autograd, with HOSVD at a fixed eps, and with the per-layer eps that :func:`actcomp.plan`
chooses for a memory budget; then every layer, plain, with HOSVD, and as :func:`actcomp.fit`
makes the whole step fit a device budget (the levers it chose and the device total before and
after). For each run the table shows what the fine-tuned layers keep, what autograd keeps in
all (measured with saved_tensors_hooks), the peak allocation of a training step, test accuracy
and the median time per step; a plot is written beside it.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from actcomp.core.config import CompressionConfig
from actcomp.app.data import digits, split
from actcomp.attach import compress, select_layers, stats
from actcomp.memory import format_bytes, measure
from actcomp.levers.microbatch import freeze_batchnorm
from actcomp.memory.fit import FitChoice, FitReport, compress_as_fit, fit
from actcomp.memory.plan import Plan, plan
from actcomp.app.models import TinyMobileNet, train_only
from actcomp.memory.format import aligned_table
from actcomp.app.torch_device import torch_device


@dataclass(frozen=True)
class DemoRow:
    method: str
    layers: int  # layers trained
    eps: str  # "1", "0.9", or the plan's per-layer eps
    layer_bytes: int  # what the fine-tuned layers kept (factors, or inputs for plain)
    saved_bytes: int  # everything autograd kept in one training step
    peak_bytes: int | None  # allocator high-water mark of one step
    accuracy: float  # mean over the fine-tuning seeds
    step_ms: float
    peak_set_by_forward: bool | None = None  # the peak is a forward's, not what backward keeps
    note: str = ""  # printed under the table (the fit run: its levers and device totals)
    accuracies: tuple[float, ...] = ()  # one per fine-tuning seed

    @property
    def accuracy_text(self) -> str:
        """Mean test accuracy, with the lowest and highest over the seeds when there are several."""
        text = f"{100 * self.accuracy:.1f}%"
        if len(self.accuracies) > 1:
            text += f" ({100 * min(self.accuracies):.1f}-{100 * max(self.accuracies):.1f})"
        return text


@dataclass(frozen=True)
class Task:
    """The transfer task: a model pretrained on digits 0-4, data of digits 5-9."""

    base: nn.Module
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    device: torch.device = torch.device("cpu")  # where the model and every batch are


def _batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator, device: torch.device):
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        index = order[start : start + batch_size]
        yield x[index].to(device), y[index].to(device)


def train(
    model: nn.Module, x: Tensor, y: Tensor, epochs: int, batch_size: int, lr: float, seed: int, desc: str, progress: bool,
    device: torch.device = torch.device("cpu"), frozen_batchnorm: bool = False,
) -> list[float]:
    """Adam on the trainable parameters of ``model`` (already on ``device``; batches are moved
    there), every BatchNorm on its running statistics with ``frozen_batchnorm``; returns the
    time of every step in ms."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step(xb: Tensor, yb: Tensor) -> float:
        optimizer.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        return loss.item()  # the host sync ends the step on an asynchronous device

    with freeze_batchnorm(model) if frozen_batchnorm else contextlib.nullcontext():
        return _timed_steps(step, x, y, epochs, batch_size, seed, desc, progress, device)


def _timed_steps(
    step: Callable[[Tensor, Tensor], float], x: Tensor, y: Tensor, epochs: int, batch_size: int, seed: int, desc: str,
    progress: bool, device: torch.device,
) -> list[float]:
    """``step(xb, yb)`` (one training step, returning its loss as a float) over ``epochs`` of
    seeded shuffled batches moved to ``device``, with a progress bar; the time of every step in ms."""
    generator = torch.Generator().manual_seed(seed)
    step_ms = []
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc=desc, leave=False, disable=not progress) as bar:
        for _ in range(epochs):
            for xb, yb in _batches(x, y, batch_size, generator, device):
                start = time.perf_counter()
                value = step(xb, yb)
                step_ms.append((time.perf_counter() - start) * 1e3)
                bar.set_postfix(loss=f"{value:.3f}")
                bar.update()
    return step_ms


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y``, on the device of the model's parameters."""
    device = next(model.parameters()).device
    model.eval()
    result = float((model(x.to(device)).argmax(1) == y.to(device)).float().mean())
    model.train()
    return result


def make_task(
    pretrain_epochs: int = 6, batch_size: int = 64, seed: int = 0, progress: bool = True, device: str | torch.device | None = None
) -> Task:
    """Pretrain a TinyMobileNet on digits 0-4 on the torch ``device`` (default CPU) and give it
    a fresh head for digits 5-9."""
    device = torch_device(device)
    torch.manual_seed(seed)
    source_x, source_y = digits(classes=(0, 1, 2, 3, 4))
    train_x, train_y, test_x, test_y = split(*digits(classes=(5, 6, 7, 8, 9)), test_fraction=0.3, seed=seed)
    base = TinyMobileNet(num_classes=5).to(device)
    train(base, source_x, source_y, pretrain_epochs, batch_size, 3e-3, seed, "pretrain on digits 0-4", progress, device)
    base.classifier.reset_parameters()
    return Task(base, train_x, train_y, test_x, test_y, device)


def check_layers(count: int, option: str = "--layers") -> None:
    """ValueError unless the demo's model has ``count`` (>= 1) Conv/Linear layers to fine-tune;
    checked on a fresh model, before any pretraining."""
    available = len(select_layers(TinyMobileNet(num_classes=5), "all"))
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= available:
        raise ValueError(f"{option} must be a whole number in 1..{available} (the demo's model has {available} Conv/Linear layers), got {count!r}")


def last_layers(task: Task, count: int) -> list[str]:
    return select_layers(task.base, f"last:{count}", sample=task.train_x[:1].to(task.device))


def finetune_copy(
    task: Task, names: list[str], config: CompressionConfig | Plan, epochs: int, batch_size: int, seed: int, progress: bool,
    frozen_batchnorm: bool = False,
) -> tuple[nn.Module, list[float]]:
    """A copy of the pretrained model with only ``names`` trainable and compressed as ``config``
    says (or as a plan says), fine-tuned on digits 5-9 (BatchNorm on its running statistics
    with ``frozen_batchnorm``)."""
    model = copy.deepcopy(task.base)
    if isinstance(config, Plan):
        config.apply(model)
        label = f"{config.method} plan"
    else:
        train_only(model, names)
        compress(model, names, config=config)
        label = config.method
    step_ms = train(model, task.train_x, task.train_y, epochs, batch_size, 3e-3, seed, f"fine-tune 5-9 ({label})", progress, task.device, frozen_batchnorm)
    return model, step_ms


def finetune_fitted(
    task: Task, names: list[str], budget: str | None, fraction: float, epochs: int, batch_size: int, seed: int, progress: bool,
    levers: FitChoice | None = None,
) -> tuple[nn.Module, list[float], FitReport]:
    """A copy of the pretrained model, the layers ``names`` trained with Adam, each step as
    :func:`actcomp.fit` makes it fit ``budget`` (default: ``fraction`` of plain autograd's
    device total, as fit measures it) on the first batch; BatchNorm on its running statistics
    (the usual fine-tuning setting, which makes micro-batching exact). ``levers``: fit those
    (checked against the budget) instead of searching, e.g. another seed's choice."""
    model = train_only(copy.deepcopy(task.base), names)
    first = (task.train_x[:batch_size].to(task.device), task.train_y[:batch_size].to(task.device))
    if budget is None:
        probe = copy.deepcopy(model)
        plain = fit(probe, torch.optim.Adam([p for p in probe.parameters() if p.requires_grad], lr=3e-3), 2**62, first, nn.functional.cross_entropy,
                    freeze_batchnorm=True, retime_rounds=0).report.plain.total_bytes
        budget = format_bytes(int(plain * fraction))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    step = fit(model, optimizer, budget, first, nn.functional.cross_entropy, freeze_batchnorm=True, levers=levers)
    step_ms = _timed_steps(
        lambda xb, yb: float(step(xb, yb)), task.train_x, task.train_y, epochs, batch_size, seed,
        f"fine-tune 5-9 (fit in {budget})", progress, task.device,
    )
    step.remove()
    return model, step_ms, step.report


def _fit_note(budget: str, report: FitReport) -> str:
    plain, chosen = report.plain, report.chosen
    measured = f"; the first real step measured {format_bytes(report.measured_total_bytes)}" if report.measured_total_bytes else ""
    return (
        f"fit in {budget}: plain autograd's device total {format_bytes(plain.total_bytes)} (resident "
        f"{format_bytes(report.resident_bytes)}: weights, Adam state, batch); fit chose {chosen.describe()}: "
        f"{format_bytes(chosen.total_bytes)} ({chosen.total_bytes / plain.total_bytes:.2f} of plain), "
        f"{chosen.step_ms / plain.step_ms:.1f}x plain's step time{measured}"
    )


def run_demo(
    layers: int = 4,
    eps: float = CompressionConfig().eps,
    budget: str = "2.5MiB",
    pretrain_epochs: int = 6,
    finetune_epochs: int = 6,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    whole_step: bool = True,
    every_eps: float = CompressionConfig().eps,
    fit_budget: str | None = None,
    fit_fraction: float = 0.25,
    seeds: int = 3,
) -> tuple[list[DemoRow], Plan]:
    """Pretrain on digits 0-4, fine-tune the last ``layers`` layers on 5-9: plain, HOSVD at
    ``eps``, and HOSVD with the eps per layer that :func:`plan` picks for ``budget`` (bytes
    autograd keeps in a step); with ``whole_step``, also every layer, plain and HOSVD at
    ``every_eps`` (the neighbours keep masks, indices and BatchNorm factors; gradient errors
    add up over every layer: at 0.95 this run lost 9 points on average over 3 pretraining
    seeds, at 0.99 0.2, BENCHMARKS.md ``quality-neighbours``), and every layer trained with each step as
    :func:`actcomp.fit` makes it fit ``fit_budget`` (default: ``fit_fraction`` of plain's
    device total; BatchNorm frozen, :func:`finetune_fitted`), beside plain autograd with
    BatchNorm frozen too (what the fitted run is exact against). ``eps`` defaults to
    :func:`actcomp.compress`'s (0.99: at 0.9 HOSVD lost 7.7 points on the last 4 layers over 3
    seeds, 83.5% against plain's 91.2%). All on the torch ``device``
    (default CPU; the peak is then the device allocator's). Everything is seeded: the model is
    pretrained once (``seed``), and every run fine-tunes it with ``seeds`` seeds (seed, seed + 1,
    ...: the order of the batches); a row's accuracy is their mean and ``accuracies`` each
    (one seed's accuracy moves by points with the batch order alone), its bytes are measured
    on the first seed's model, its step time is the median over all of them; the fit run
    searches on the first seed and reuses its levers. Returns the rows and the plan."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a whole number >= 1, got {seeds!r}")
    task = make_task(pretrain_epochs, batch_size, seed, progress, device)
    names = last_layers(task, layers)
    calib = [(task.train_x[:batch_size].to(task.device), task.train_y[:batch_size].to(task.device))]
    chosen = plan(task.base, calib, budget=budget, candidates=names, loss_fn=nn.functional.cross_entropy)
    every = select_layers(task.base, "all")
    runs = [
        ("none", names, CompressionConfig("none"), "1"),
        ("hosvd", names, CompressionConfig("hosvd", eps), f"{eps:g}"),
        (f"hosvd, plan for {budget}", names, chosen, "/".join(f"{c.eps:g}" if c.train else "-" for c in chosen.choices)),
    ]
    if whole_step:  # every layer trained: the neighbours' policies and the peak move too
        runs += [
            ("none, every layer", every, CompressionConfig("none"), "1"),
            ("hosvd, every layer", every, CompressionConfig("hosvd", every_eps), f"{every_eps:g}"),
            ("none, every layer, BatchNorm frozen", every, CompressionConfig("none"), "1"),  # what fit is exact against
            ("fit", every, None, ""),  # the whole step fitted into a device budget
        ]
    rows = []
    for method, run_names, config, eps_text in runs:
        frozen = method.endswith("BatchNorm frozen")
        note = ""
        models, step_ms, reports = [], [], []
        for run_seed in range(seed, seed + seeds):
            if config is None:  # the fitted run: the first seed searches, the others take its levers
                first = reports[0] if reports else None
                model, times, report = finetune_fitted(
                    task, run_names, fit_budget or (first and format_bytes(first.budget_bytes)), fit_fraction, finetune_epochs,
                    batch_size, run_seed, progress, levers=first and first.chosen,
                )
                reports.append(report)
            else:
                model, times = finetune_copy(task, run_names, config, finetune_epochs, batch_size, run_seed, progress, frozen)
            models.append(model)
            step_ms += times
        accuracies = tuple(accuracy(m, task.test_x, task.test_y) for m in models)
        model = models[0]
        if config is None:
            fitted = reports[0]
            budget_text = fit_budget or format_bytes(fitted.budget_bytes)
            method, note = f"fit in {budget_text}", _fit_note(budget_text, fitted)
            compression = fitted.chosen.compression
            eps_text = f"{compression.eps:g}" if compression is not None else "1"
            if compression is not None:  # measure what the chosen compression keeps
                compress_as_fit(model, compression)
        # the fitted step keeps one micro-batch's graph at a time: what autograd keeps is measured on one
        chunk = -(-batch_size // fitted.chosen.micro_batches) if config is None else batch_size
        report = measure(model, calib[0][0][:chunk], calib[0][1][:chunk], nn.functional.cross_entropy, vanilla=False)
        peak = fitted.chosen.peak_bytes if config is None else report.peak_bytes  # the fitted step's, levers applied
        trained = sum(1 for m in dict(model.named_modules()).values() if any(p.requires_grad for p in m.parameters(recurse=False)))
        rows.append(
            DemoRow(
                method=method,
                layers=trained,
                eps=eps_text,
                layer_bytes=sum(s.kept_bytes for s in stats(model).values()),
                saved_bytes=report.saved_bytes,
                peak_bytes=peak,
                accuracy=statistics.fmean(accuracies),
                step_ms=statistics.median(step_ms),
                peak_set_by_forward=report.peak_set_by_forward,
                note=note,
                accuracies=accuracies,
            )
        )
    return rows, chosen


def format_table(rows: list[DemoRow]) -> str:
    """The demo's rows as an aligned text table."""
    header = ("method", "layers", "eps", "kept by layers", "kept by autograd", "peak", "accuracy", "ms/step")
    lines = [
        (
            r.method, str(r.layers), r.eps, format_bytes(r.layer_bytes), format_bytes(r.saved_bytes),
            format_bytes(r.peak_bytes) if r.peak_bytes is not None else "n/a", r.accuracy_text, f"{r.step_ms:.1f}",
        )
        for r in rows
    ]
    text = aligned_table(header, lines)
    text += "".join(f"\n{r.note}" for r in rows if r.note)
    forward_set = [r.method for r in rows if r.peak_set_by_forward]
    if forward_set:
        text += (
            f"\nnote: the peak of {', '.join(forward_set)} is set by the forward (a forward without gradients "
            "reaches it: activations of frozen layers, each layer's output before the next): compressing more "
            "will not lower it, a smaller batch will"
        )
    return text


def rows_as_dicts(rows: list[DemoRow]) -> list[dict]:
    return [asdict(r) for r in rows]
