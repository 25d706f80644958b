"""plan(): which layers to train and with which eps, so that a training step fits a budget.

On calibration batches the planner measures, for every candidate layer and every eps of a
grid, what the layer's compressed kernel keeps (bytes of its factors, taken from the real
kernel) and the error of its weight gradient against the exact one. By default that error is
what is left after averaging over the steps: with e_b = dW_eps,b - dW_b over the calibration
batches (or the chunks of the one batch given), the bias sqrt(max(0, ||mean e||^2 - tr Cov(e) /
n)) (the part of the error that every step repeats) and the spread sqrt(tr Cov(e)) (the part
that changes from batch to batch), sqrt(bias^2 + spread^2 / 10) / ||mean dW||, the error of a
gradient averaged over 10 steps as Adam's first moment averages it
(:class:`actcomp.memory.error.RunningError`). For a truncation it is close to the bias: on the
demo task the median per-layer bias ordered compressed variants by the accuracy they lose
(Spearman 0.73, BENCHMARKS.md ``quality-measures``), where one batch's relative error
||dW_eps - dW|| / ||dW|| did not (-0.10); the spread term keeps a sampled estimator, unbiased
but noisy, from looking free. ``error="relative"`` keeps the relative error. A layer left frozen
costs nothing and has error 1 (no gradient at all).
Training layers from the s-th candidate on (in execution order) also makes everything after it
keep what backward needs through it (ReLU, BatchNorm, the loss): that overhead O(s) is measured
too, with saved_tensors_hooks, for every s. Then, for each s, a multiple-choice knapsack over
the candidates from s on (min total error subject to O(s) + sum of bytes <= budget) is solved
exactly by merging Pareto frontiers of (bytes, error); the best s wins. This is ASI's planner
(ICML 2025), with the overhead of the trained suffix made part of the budget.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from actcomp.core.config import CompressionConfig
from actcomp.devices import DeviceProfile, load_device
from actcomp.attach.select import LayerSelector, execution_order, select_layers
from actcomp.attach.swap import attach_neighbour, compress, neighbour_states, restore, stats
from actcomp.kernels import base_type
from actcomp.methods import method_class, method_names
from actcomp.core.batch import call_model, probe_loss
from actcomp.memory.measure import format_bytes, measure
from actcomp.policies import Neighbours, factor_config, tradeable_neighbour
from actcomp.levers.microbatch import _batch_size, split_batch
from actcomp.memory.error import RunningError
from actcomp.memory.saved import count_saved
from actcomp.memory.format import aligned_table

DEFAULT_EPS_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_bytes(budget: int | float | str) -> int:
    """``"512KiB"`` -> 524288, ``"1.5MB"`` -> 1500000, ``4096`` -> 4096."""
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a number of bytes or a string like '512KiB', got {budget!r}")
    if isinstance(budget, (int, float)):
        value = float(budget)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?i?[bB]?)\s*", str(budget))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"budget must be a number of bytes or a string like '512KiB' or '2MB', got {budget!r}")
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"budget must be positive, got {budget!r}")
    return int(value)


@dataclass(frozen=True)
class LayerChoice:
    """What the plan does with one candidate layer."""

    name: str
    layer_type: str
    train: bool
    eps: float | None  # None when frozen
    kept_bytes: int  # factors kept for backward (0 when frozen)
    param_bytes: int  # its parameters: gradients (and optimizer state) cost this again when trained
    grad_error: float  # ||dW_eps - dW|| / ||dW|| measured on the calibration batches; 1 when frozen
    averaged_error: float | None = None  # sqrt(bias^2 + spread^2 / 10) of dW_eps (error="averaged"); 1 when frozen; None: not measured


@dataclass(frozen=True)
class NeighbourChoice:
    """What the plan does with one neighbour whose policy trades accuracy for bytes (a
    BatchNorm using batch statistics): keep its input (``eps`` None) or factors of its
    normalised input at ``eps``."""

    name: str
    layer_type: str
    eps: float | None
    kept_bytes: int  # what it keeps under this choice
    grad_error: float  # ||dX_eps - dX|| / ||dX|| on the calibration batches; 0 when kept
    averaged_error: float | None = None  # sqrt(bias^2 + spread^2 / 10) of dX_eps (error="averaged"); 0 when kept; None: not measured


@dataclass
class Plan:
    """The chosen layers and eps, with the memory the planner predicts for one step."""

    budget_bytes: int
    scope: str  # "activations" or "step"
    method: str
    choices: list[LayerChoice]
    overhead_bytes: int  # what the rest of the step keeps (ReLU, BatchNorm, loss, ...)
    fixed_bytes: int  # weights (scope "step"), else 0
    optimizer_copies: int
    device: str | None = None
    notes: list[str] = field(default_factory=list)
    neighbours: list[NeighbourChoice] = field(default_factory=list)
    error_measure: str = "relative"  # what the plan minimised: "averaged" or "relative" (older plans)

    @property
    def trained(self) -> list[LayerChoice]:
        return [c for c in self.choices if c.train]

    @property
    def predicted_saved_bytes(self) -> int:
        """Bytes autograd keeps in one step under this plan (as measured on the calibration batches)."""
        return self.overhead_bytes + sum(c.kept_bytes for c in self.choices) + sum(n.kept_bytes for n in self.neighbours)

    @property
    def predicted_bytes(self) -> int:
        """What is checked against the budget: saved bytes, plus for scope 'step' the weights and
        the gradients and optimizer state of the trained layers."""
        if self.scope == "activations":
            return self.predicted_saved_bytes
        grads = sum(c.param_bytes for c in self.trained) * (1 + self.optimizer_copies)
        return self.fixed_bytes + grads + self.predicted_saved_bytes

    @property
    def total_error(self) -> float:
        """What the planner minimised: the sum over the candidates (and the BatchNorms it chose
        for) of ``error_measure``, the averaged or the relative error; a frozen layer counts 1."""
        return sum(_measured(c, self.error_measure) for c in self.choices) + sum(_measured(n, self.error_measure) for n in self.neighbours)

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze the model but the trained layers and compress from the first trained layer on.

        Trained layers get the chosen eps; candidates after the first trained one that stay
        frozen are compressed too, which makes them keep nothing (their input gradient needs
        only the weight). Layers before the first trained one are untouched and frozen.
        Neighbours keep masks, indices or nothing (exact) everywhere, and the BatchNorms the
        plan lists keep factors at their eps or their input, as chosen. Returns ``model``.
        """
        restore(model)
        model.requires_grad_(False)
        modules = dict(model.named_modules())
        names = [c.name for c in self.choices]
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"this plan was made for another model: no layer named {missing[0]!r}")
        started = False
        for choice in self.choices:
            started = started or choice.train
            if not started:
                continue
            module = modules[choice.name]
            if choice.train:
                module.requires_grad_(True)
            compress(model, [choice.name], config=CompressionConfig(self.method, choice.eps or 1.0))
        chosen = {n.name: n for n in self.neighbours}
        for name, state in neighbour_states(model).items():
            n = chosen.get(name)
            state.approximate = n is not None and n.eps is not None
            if state.approximate:
                state.configure(factor_config(CompressionConfig(self.method, n.eps), Neighbours()))
        return model

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(predicted_saved_bytes=self.predicted_saved_bytes, predicted_bytes=self.predicted_bytes, total_error=self.total_error)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @staticmethod
    def from_json(text: str) -> "Plan":
        data = json.loads(text)
        for key in ("predicted_saved_bytes", "predicted_bytes", "total_error"):
            data.pop(key, None)
        data["choices"] = [LayerChoice(**c) for c in data["choices"]]
        data["neighbours"] = [NeighbourChoice(**n) for n in data.get("neighbours", [])]
        return Plan(**data)

    @staticmethod
    def load(path: str | Path) -> "Plan":
        return Plan.from_json(Path(path).read_text())

    def table(self) -> str:
        header = ["layer", "type", "train", "eps", "kept", "grad error", "averaged error"]
        rows = [
            [c.name, c.layer_type, "yes" if c.train else "no", f"{c.eps:g}" if c.eps is not None else "-", format_bytes(c.kept_bytes), f"{c.grad_error:.4f}", _text(c.averaged_error)]
            for c in self.choices
        ]
        rows += [
            [n.name, n.layer_type, "(neighbour)", f"{n.eps:g}" if n.eps is not None else "keep", format_bytes(n.kept_bytes), f"{n.grad_error:.4f}", _text(n.averaged_error)]
            for n in self.neighbours
        ]
        lines = [aligned_table(header, rows)]
        target = f" ({self.device})" if self.device else ""
        lines.append(
            f"{len(self.trained)} of {len(self.choices)} layers trained, method {self.method}; predicted {format_bytes(self.predicted_bytes)} "
            f"of budget {format_bytes(self.budget_bytes)}{target}, scope {self.scope} "
            f"(saved {format_bytes(self.predicted_saved_bytes)}, of which {format_bytes(self.overhead_bytes)} outside the candidates and the BatchNorms chosen for); "
            f"total {'averaged' if self.error_measure == 'averaged' else 'gradient'} error {self.total_error:.3f}"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _measured(choice: LayerChoice | NeighbourChoice, measure: str) -> float:
    """The error of one choice the plan minimised (the relative error where none other was measured)."""
    return choice.averaged_error if measure == "averaged" and choice.averaged_error is not None else choice.grad_error


def _text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _as_args(batch: object) -> tuple[tuple | Mapping, object]:
    """A calibration batch is (inputs, targets) or inputs alone; inputs a tensor, a tuple, or
    a dict of keyword arguments (a Hugging Face ``BatchEncoding``, whose output's ``.loss``
    is the loss)."""
    if isinstance(batch, Mapping):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
    else:
        inputs, targets = batch, None
    return (inputs if isinstance(inputs, (tuple, Mapping)) else (inputs,)), targets


def _loss(model: nn.Module, batch: object, loss_fn: Callable | None) -> Tensor:
    args, targets = _as_args(batch)
    return probe_loss(call_model(model, args), targets, loss_fn)


def _capture(model: nn.Module, names: list[str], batch: object, loss_fn: Callable | None) -> dict[str, tuple[Tensor, Tensor]]:
    """Each candidate's input and output gradient in one plain training step."""
    modules = dict(model.named_modules())
    captured: dict[str, list[Tensor]] = {}
    handles = []
    for name in names:
        def hook(module: nn.Module, args: tuple, output: Tensor, name: str = name) -> None:
            if output.requires_grad:  # modules before the first trainable one see no gradient
                captured[name] = [args[0].detach()]
                output.register_hook(lambda grad: captured[name].append(grad.detach()))

        handles.append(modules[name].register_forward_hook(hook))
    try:
        _loss(model, batch, loss_fn).backward()
    finally:
        for h in handles:
            h.remove()
    return {n: (v[0], v[1]) for n, v in captured.items() if len(v) == 2}


def _layer_grad(module: nn.Module, x: Tensor, dy: Tensor, config: CompressionConfig) -> tuple[int, Tensor]:
    """Run a copy of one layer as ``config`` says (method 'none': plain autograd) on x; the bytes
    it keeps for backward and the weight gradient it computes for the output gradient dy."""
    layer = copy.deepcopy(module)
    restore(layer)
    weights = _weights(layer)
    layer.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    compress(layer, [""], config=config)
    layer.train()
    grads = torch.autograd.grad(layer(x), weights, dy)
    return stats(layer)[""].kept_bytes, torch.cat([g.reshape(-1) for g in grads])


def _weights(module: nn.Module) -> list[nn.Parameter]:
    """What training a candidate means: its ``weight`` parameter, or for a layer whose weight
    is computed (an SVD-parametrised layer) every own parameter but the bias."""
    weight = module._parameters.get("weight")
    if weight is not None:
        return [weight]
    return [p for n, p in module.named_parameters(recurse=False) if n != "bias"]


@dataclass(frozen=True)
class Option:
    """One choice for one item of the knapsack: its bytes, its error and what it stands for."""

    nbytes: int
    error: float
    key: Any


@dataclass(frozen=True)
class Selection:
    """The knapsack's answer: total error and bytes, and the key picked for every item."""

    error: float
    nbytes: int
    keys: tuple


def pareto_knapsack(items: Sequence[Sequence[Option]], capacity: int) -> Selection | None:
    """Exact multiple-choice knapsack: one option per item, least total error with
    total bytes <= capacity (ties: fewer bytes); None when no choice fits.

    Frontiers of non-dominated (bytes, error, keys) are merged item by item: after item i the
    frontier holds, for every reachable byte total, only selections with less error than every
    cheaper one, so the optimum over all items is on the last frontier.
    """
    frontier: list[Selection] = [Selection(0.0, 0, ())]
    for options in items:
        merged = [
            Selection(sel.error + o.error, sel.nbytes + o.nbytes, sel.keys + (o.key,))
            for sel in frontier
            for o in options
            if sel.nbytes + o.nbytes <= capacity
        ]
        merged.sort(key=lambda t: (t.nbytes, t.error))
        frontier = []
        for entry in merged:
            if not frontier or entry.error < frontier[-1].error - 1e-12:
                frontier.append(entry)
        if not frontier:
            return None
    return min(frontier, key=lambda t: (t.error, t.nbytes))


@dataclass(frozen=True)
class EpsCost:
    """What training one layer at one eps costs on the calibration batches: bytes its factors
    keep (largest over the batches) and the relative error of its weight gradient (mean)."""

    eps: float
    kept_bytes: int
    grad_error: float
    averaged_error: float | None = None  # over the average batches (or chunks); None when not measured (or never reached by backward)

    def error(self, measure: str) -> float:
        """The error the knapsack minimises under ``measure`` ("averaged" or "relative")."""
        return self.averaged_error if measure == "averaged" and self.averaged_error is not None else self.grad_error


@dataclass(frozen=True)
class _Candidates:
    """The model copy the planner works on, its candidate layers in execution order, and the
    neighbours whose policy trades accuracy for bytes (BatchNorm on batch statistics), each
    with its position in execution order."""

    work: nn.Module
    names: list[str]
    modules: dict[str, nn.Module]
    position: dict[str, int]
    tradeable: list[str]

    def tradeable_after(self, s: int) -> list[str]:
        """The tradeable neighbours after candidate s: backward passes through them."""
        start = self.position[self.names[s]]
        return [n for n in self.tradeable if self.position[n] > start]


def _candidates(model: nn.Module, batches: list[object], candidates: LayerSelector) -> _Candidates:
    """Phase 1: a plain, trainable copy of the model, the candidates its forward calls and the
    neighbours whose registration lets the planner trade them (BatchNorm on batch statistics)."""
    work = copy.deepcopy(model)
    restore(work)
    work.train()
    first_args, _ = _as_args(batches[0])
    order = execution_order(work, first_args)
    position = {n: i for i, n in enumerate(order)}
    names = sorted((n for n in select_layers(work, candidates) if n in position), key=position.__getitem__)
    if not names:
        raise ValueError("no candidate layer is called by the model's forward on the calibration batch")
    modules = dict(work.named_modules())
    work.requires_grad_(False)
    for n in names:
        for w in _weights(modules[n]):
            w.requires_grad_(True)
    tradeable = [n for n in order if tradeable_neighbour(modules[n])]
    return _Candidates(work, names, modules, position, tradeable)


def _eps_costs(
    c: _Candidates, batches: list[object], method: str, grid: list[float], loss_fn: Callable | None, average_batches: list[object] | None = None
) -> tuple[dict[str, list[EpsCost]], dict[str, list[EpsCost]]]:
    """Phase 2: per candidate and eps, the bytes its real kernel keeps and its gradient error;
    per tradeable BatchNorm and eps, the bytes its factors policy keeps and its dX error. Bytes
    and the relative error come from ``batches``; with ``average_batches`` (the batches themselves,
    or chunks of the one batch), also the averaged error over those, accumulated batch by batch."""
    names = c.names + c.tradeable
    kept = {n: {e: 0 for e in grid} for n in names}
    error = {n: {e: 0.0 for e in grid} for n in names}
    averaged = {n: {e: RunningError() for e in grid} for n in names}
    neighbours = set(c.tradeable)

    def grad_at(n: str, x: Tensor, dy: Tensor, eps: float | None) -> tuple[int, Tensor]:  # eps None: exact
        if n in neighbours:
            return _neighbour_grad(c.modules[n], n, x, dy, eps, method)
        return _layer_grad(c.modules[n], x, dy, CompressionConfig("none") if eps is None else CompressionConfig(method, eps))

    def run(batch: object, sizes: bool, averages: bool) -> None:
        captured = _capture(c.work, names, batch, loss_fn)
        for n in names:
            if n not in captured:
                continue
            x, dy = captured[n]
            _, exact = grad_at(n, x, dy, None)
            scale = exact.norm().item() or 1.0
            for e in grid:
                nbytes, grad = grad_at(n, x, dy, e)
                if sizes:
                    kept[n][e] = max(kept[n][e], nbytes)
                    error[n][e] += (grad - exact).norm().item() / scale / len(batches)
                if averages:
                    averaged[n][e].add(grad, exact)

    same = average_batches is batches
    for batch in batches:
        run(batch, True, same)
    for batch in average_batches if average_batches is not None and not same else ():
        run(batch, False, True)
    costs = {
        n: [EpsCost(e, kept[n][e], error[n][e], averaged[n][e].averaged() if averaged[n][e].count >= 2 else None) for e in grid]
        for n in names
    }
    return {n: costs[n] for n in c.names}, {n: costs[n] for n in c.tradeable}


def _neighbour_grad(module: nn.Module, name: str, x: Tensor, dy: Tensor, eps: float | None, method: str) -> tuple[int, Tensor]:
    """Run a copy of a neighbour on x with its factors policy at eps (None: plain autograd);
    the bytes it keeps and its input gradient for dy."""
    copied = copy.deepcopy(module)
    restore(copied)
    if eps is not None:
        attach_neighbour(copied, name, factor_config(CompressionConfig(method, eps), Neighbours()), Neighbours(), approximate=True)
    x = x.clone().requires_grad_()
    with count_saved(copied) as saved:
        y = copied(x)
    (grad,) = torch.autograd.grad(y, x, dy)
    return saved.saved_bytes, grad


def _suffix_overheads(c: _Candidates, batches: list[object], method: str, eps: float, loss_fn: Callable | None) -> tuple[list[int], list[dict[str, int]]]:
    """Phase 3: O(s), what the step keeps besides the candidates' factors and the tradeable
    BatchNorms when candidates s.. train (masks, indices, the loss, ...), and what each of
    those BatchNorms keeps with plain autograd; measured per module in one step."""
    overhead, keep_bytes = [], []
    for s in range(len(c.names)):
        trial = copy.deepcopy(c.work)
        trial.requires_grad_(False)
        trial_modules = dict(trial.named_modules())
        for n in c.names[s:]:
            for w in _weights(trial_modules[n]):
                w.requires_grad_(True)
        compress(trial, c.names[s:], method=method, eps=eps, neighbours=Neighbours(batchnorm="keep"))
        tradeable = set(c.tradeable_after(s))
        worst, plain = 0, {n: 0 for n in tradeable}
        for batch in batches:
            args, targets = _as_args(batch)
            rows = measure(trial, args, targets, loss_fn, vanilla=False).rows
            factors = sum(st.kept_bytes for st in stats(trial).values())
            for row in rows:
                if row.name in tradeable:
                    plain[row.name] = max(plain[row.name], row.saved_bytes)
            rest = sum(row.saved_bytes for row in rows if row.name not in tradeable) - factors
            worst = max(worst, rest)
        overhead.append(worst)
        keep_bytes.append(plain)
    return overhead, keep_bytes


@dataclass(frozen=True)
class _Solution:
    """Phase 4's answer: the first trainable candidate s, the eps (None: frozen) of each
    candidate from s on and of each tradeable BatchNorm after s (None: kept plain), with the
    total error (frozen layers count 1) and bytes."""

    start: int
    picks: tuple
    neighbour_picks: tuple
    error: float
    nbytes: int


def _solve(
    c: _Candidates,
    costs: dict[str, list[EpsCost]],
    neighbour_costs: dict[str, list[EpsCost]],
    overheads: list[int],
    keep_bytes: list[dict[str, int]],
    fixed: int,
    budget: int,
    extra_bytes: dict[str, int],
    measure: str = "relative",
) -> tuple[_Solution | None, tuple[int, str, float]]:
    """Phase 4: for every start s, the knapsack over candidates s.. and the tradeable
    BatchNorms after s, under the budget left after the overhead O(s) and the fixed bytes; the
    best s wins; ``measure`` picks the error minimised (see :meth:`EpsCost.error`). Also returns the cheapest step that trains one layer (total bytes, layer,
    eps), for the message of an infeasible budget."""
    names = c.names
    best: _Solution | None = None
    cheapest: tuple[int, str, float] | None = None
    for s in range(len(names)):
        items = [
            [Option(0, 1.0, None), *(Option(cost.kept_bytes + extra_bytes[n], cost.error(measure), cost.eps) for cost in costs[n])]
            for n in names[s:]
        ]
        tradeable = c.tradeable_after(s)
        items += [
            [Option(keep_bytes[s].get(n, 0), 0.0, None), *(Option(cost.kept_bytes, cost.error(measure), cost.eps) for cost in neighbour_costs[n])]
            for n in tradeable
        ]
        smallest = min(items[0][1:], key=lambda o: o.nbytes)
        total = smallest.nbytes + overheads[s] + fixed + sum(min(o.nbytes for o in item) for item in items[len(names) - s :])
        if cheapest is None or total < cheapest[0]:
            cheapest = (total, names[s], smallest.key)
        capacity = budget - overheads[s] - fixed
        if capacity < 0:
            continue
        selection = pareto_knapsack(items, capacity)
        if selection is None or all(k is None for k in selection.keys[: len(names) - s]):
            continue
        error = selection.error + s  # the candidates before s are frozen: error 1 each
        if best is None or (error, selection.nbytes) < (best.error, best.nbytes):
            layer_keys, neighbour_keys = selection.keys[: len(names) - s], selection.keys[len(names) - s :]
            best = _Solution(s, layer_keys, tuple(zip(tradeable, neighbour_keys)), error, selection.nbytes)
    assert cheapest is not None
    return best, cheapest


def plan(
    model: nn.Module,
    calib_batches: Sequence[object],
    budget: int | float | str | None = None,
    device: str | DeviceProfile | None = None,
    *,
    candidates: LayerSelector = "all",
    method: str = "hosvd",
    eps_grid: Sequence[float] = DEFAULT_EPS_GRID,
    loss_fn: Callable | None = None,
    scope: str = "activations",
    optimizer_copies: int = 0,
    error: str = "averaged",
) -> Plan:
    """Choose the layers to train and an eps for each so that a training step fits a budget.

    ``calib_batches``: a few batches, each ``(inputs, targets)`` (or inputs alone with a
    ``loss_fn`` of the output only; the mean square of the output without a loss_fn).
    ``budget``: bytes or a string (``"512KiB"``, ``"2MB"``); or ``device``: a profile name or
    :class:`DeviceProfile`, whose ``budget_bytes`` (RAM minus reserve) is used. ``scope``:
    ``"activations"`` checks only what autograd keeps; ``"step"`` adds all weights and, per
    trained layer, its gradient and ``optimizer_copies`` optimizer-state copies of its
    parameters (0 SGD, 1 momentum, 2 Adam). ``candidates``: the layers the planner may train,
    as for :func:`actcomp.compress`, ordered by execution. Bytes are the largest, errors the mean
    over the calibration batches. ``error``: what the knapsack minimises per layer,
    ``"averaged"`` (default) sqrt(bias^2 + spread^2 / 10) of its weight gradient over the
    calibration batches, or over chunks of the one batch given (up to 8 chunks of at least 2
    samples; a batch of fewer than 4 samples falls back to the relative error, said in the
    plan's notes), or ``"relative"`` the mean of ||dW_eps - dW|| / ||dW|| (see the module
    docstring for why). The
    model is not modified (use :meth:`Plan.apply`). An infeasible budget raises ValueError
    stating the smallest budget that trains one layer.

    Phases: candidates (:func:`_candidates`), per-layer costs of every eps
    (:func:`_eps_costs`), the overhead of each trained suffix (:func:`_suffix_overheads`), and
    the exact solve (:func:`_solve` with :func:`pareto_knapsack`).
    """
    if (budget is None) == (device is None):
        raise ValueError("give exactly one of budget= or device=")
    profile = load_device(device) if isinstance(device, str) else device
    budget_bytes = profile.budget_bytes if profile is not None else parse_bytes(budget)  # type: ignore[arg-type]
    if scope not in ("activations", "step"):
        raise ValueError(f"scope must be 'activations' or 'step', got {scope!r}")
    grid = sorted({CompressionConfig(method, e).eps for e in eps_grid})
    if not grid:
        raise ValueError("eps_grid is empty; give at least one eps in (0, 1]")
    if method_class(method).knob != "eps":
        tunable = [m for m in method_names() if method_class(m).knob == "eps"]
        names = ", ".join(map(repr, tunable[:-1])) + f" or {tunable[-1]!r}" if len(tunable) > 1 else repr(tunable[0])
        raise ValueError(f"plan chooses an eps per layer, so it needs method {names}, got {method!r}")
    if error not in ("averaged", "relative"):
        raise ValueError(f"error must be 'averaged' or 'relative', got {error!r}")
    batches = list(calib_batches)
    if not batches:
        raise ValueError("plan needs at least one calibration batch")
    average_batches, notes = _average_batches(batches) if error == "averaged" else (None, [])
    measure = "averaged" if average_batches is not None else "relative"

    c = _candidates(model, batches, candidates)
    costs, neighbour_costs = _eps_costs(c, batches, method, grid, loss_fn, average_batches)
    overheads, keep_bytes = _suffix_overheads(c, batches, method, grid[0], loss_fn)
    param_bytes = {n: sum(p.numel() * p.element_size() for p in c.modules[n].parameters()) for n in c.names}
    fixed = sum(p.numel() * p.element_size() for p in c.work.parameters()) if scope == "step" else 0
    per_param = (1 + optimizer_copies) if scope == "step" else 0
    extra = {n: param_bytes[n] * per_param for n in c.names}
    best, cheapest = _solve(c, costs, neighbour_costs, overheads, keep_bytes, fixed, budget_bytes, extra, measure)
    if best is None:
        need = cheapest[0]
        raise ValueError(
            f"budget {format_bytes(budget_bytes)} ({budget_bytes} bytes, scope {scope}) is infeasible: "
            f"training even one layer needs at least {format_bytes(need)} ({need} bytes: "
            f"layer '{cheapest[1]}' at eps {cheapest[2]:g} with every other layer frozen)"
        )
    by_eps = {n: {cost.eps: cost for cost in costs[n]} for n in c.names}
    choices = []
    for i, n in enumerate(c.names):
        e = best.picks[i - best.start] if i >= best.start else None
        choices.append(
            LayerChoice(
                name=n,
                layer_type=base_type(c.modules[n]).__name__,
                train=e is not None,
                eps=e,
                kept_bytes=by_eps[n][e].kept_bytes if e is not None else 0,
                param_bytes=param_bytes[n],
                grad_error=by_eps[n][e].grad_error if e is not None else 1.0,
                averaged_error=(by_eps[n][e].averaged_error if e is not None else 1.0) if measure == "averaged" else None,
            )
        )
    first = next(i for i, choice in enumerate(choices) if choice.train)
    by_eps.update({n: {cost.eps: cost for cost in neighbour_costs[n]} for n in c.tradeable})
    neighbours = [
        NeighbourChoice(
            name=n, layer_type=base_type(c.modules[n]).__name__, eps=e,
            kept_bytes=by_eps[n][e].kept_bytes if e is not None else keep_bytes[best.start][n],
            grad_error=by_eps[n][e].grad_error if e is not None else 0.0,
            averaged_error=(by_eps[n][e].averaged_error if e is not None else 0.0) if measure == "averaged" else None,
        )
        for n, e in best.neighbour_picks
    ]
    notes = [
        "bytes are the largest over the calibration batches: eps fixes explained variance, not rank, so other batches may keep more or less",
        *notes,
    ]
    return Plan(
        budget_bytes=budget_bytes,
        scope=scope,
        method=method,
        choices=choices,
        overhead_bytes=overheads[first],
        fixed_bytes=fixed,
        optimizer_copies=optimizer_copies if scope == "step" else 0,
        device=profile.name if profile is not None else None,
        notes=notes,
        neighbours=neighbours,
        error_measure=measure,
    )


def _average_batches(batches: list[object]) -> tuple[list[object] | None, list[str]]:
    """What the averaged error is measured over: the calibration batches when there are several,
    else the one batch in min(8, size // 2) chunks; None (and a note) for one batch under 4 samples."""
    if len(batches) >= 2:
        return batches, []
    size = _batch_size(batches[0])
    chunks = min(8, (size or 0) // 2)
    if chunks < 2:
        return None, [f"one calibration batch of {size} samples is too small to measure the averaged error (it needs at least 2 chunks of >= 2 samples): the relative error was minimised; give more batches"]
    return split_batch(batches[0], chunks), []
