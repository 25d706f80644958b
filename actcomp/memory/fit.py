"""fit(): make one fine-tuning step fit a device's memory budget, with the cheapest levers.

A device must hold, for one training step, its resident bytes (weights, buffers, optimizer
state, the batch) plus the step's peak above them (forward transients; what autograd keeps;
the parameter gradients; the optimizer step's temporaries). :func:`fit` measures that device
total for combinations of levers on copies of the model and the optimizer (the originals are
left as they were, and no update is taken), and picks the combination with the least measured
step time whose total fits the budget and whose gradient error stays within ``max_error``:

* micro-batching (``micro_batches`` = k): every activation term / k, exact without batch
  statistics (:mod:`actcomp.levers.microbatch`);
* recompute of blocks and regions (:mod:`actcomp.levers.recompute`): a block (or a run of
  sibling modules its parent's forward chains, such as a ResNet stem) keeps its input only, one
  extra forward, exact;
* the optimizer step in backward (:mod:`actcomp.levers.step_in_backward`): the parameter
  gradients are never all alive, exact for the element-wise optimizers;
* exact policies (:data:`EXACT_POLICIES`: :func:`actcomp.compress` with method ``"none"``):
  the layers keep their inputs, but ReLU-family activations keep 1-bit masks, max-pools
  uint8 window positions, average pools nothing, instead of float tensors; exact;
* compression (:func:`actcomp.compress` of every trainable layer, with the default neighbour
  policies; with recompute, of those outside the recomputed blocks, which keep nothing inside
  anyway): what autograd keeps -> factors, approximate below eps 1; used only when the exact
  levers do not reach the budget or are slower.

The gradient error of a combination is measured on the calibration batch: ||g - g_plain|| /
||g_plain|| over every trainable parameter, g_plain the plain full-batch gradient (exact levers
have none, but for micro-batches through BatchNorm in train mode). For approximate compression
``max_error`` bounds another measure, the one that predicted the accuracy lost on the demo task
(BENCHMARKS.md ``quality-measures``: Spearman 0.73 over 13 variants, where one batch's relative
error gave -0.10): the median over the weight tensors of each tensor's bias (the error every
step repeats, the batch-to-batch spread removed) relative to its own mean gradient, with the
calibration batch in up to 8 chunks against plain autograd on the same chunks
(:func:`~actcomp.memory.error.median_layer_bias`); there, a bias of 0.1 or less lost at most 1.4
points. Compressed combinations must fit with ``headroom`` to spare: eps fixes the explained
variance, not the rank, so another batch may keep larger factors.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from actcomp.attach.select import select_layers
from actcomp.attach.swap import compress, restore
from actcomp.core.batch import batch_bytes, step_loss
from actcomp.core.batch import model_inputs as _inputs_of
from actcomp.core.config import CompressionConfig
from actcomp.levers.microbatch import _batch_size as _size_along_dim0
from actcomp.levers.microbatch import batch_statistics_modules, freeze_batchnorm, microbatch_step
from actcomp.levers.recompute import Recompute, _members, auto_blocks, auto_regions, checkpoint_blocks
from actcomp.levers.step_in_backward import EXACT_OPTIMIZERS, StepInBackward, optimizer_in_backward
from actcomp.memory.error import median_layer_bias
from actcomp.memory.format import aligned_table
from actcomp.memory.measure import _optimizer_state_bytes, _peak_of, format_bytes, rebuilt_optimizer
from actcomp.memory.plan import parse_bytes
from actcomp.policies.base import Neighbours

__all__ = ["BudgetExceededError", "EXACT_POLICIES", "FitChoice", "FitReport", "FittedStep", "fit"]

EXACT_POLICIES = CompressionConfig("none", 1.0)
"""fit's ``"exact_policies"`` lever as a compression: every layer plain (it keeps its input),
ReLU-family activations keep 1-bit masks, max-pools uint8 window positions, average pools
nothing, BatchNorm its input (:func:`compress_as_fit`); exact, no headroom needed."""


def compress_as_fit(model: nn.Module, compression: CompressionConfig, layers: Any = "all", sample: Any = None) -> nn.Module:
    """:func:`actcomp.compress` as fit applies ``compression`` (a chosen
    ``FitChoice.compression``): :data:`EXACT_POLICIES` with BatchNorm keeping its input itself
    (its default factors of x_hat are exact only at eps 1, up to rounding), anything else with
    the default neighbour policies."""
    neighbours: Neighbours | str = Neighbours(batchnorm="keep") if compression == EXACT_POLICIES else "auto"
    return compress(model, layers, config=compression, neighbours=neighbours, sample=sample)


def _compress_outside(model: nn.Module, compression: CompressionConfig, recompute: Sequence[str], sample: Any) -> None:
    """:func:`compress_as_fit` of the layers outside the recomputed blocks and regions (inside
    them nothing is kept); the modules of a region are then returned to plain autograd,
    neighbour policies too: the region keeps only its input, and a policy's own work there only
    adds to its recompute (resnet18's stem, batch 8, 128 px: the max-pool's index arithmetic
    raised the step's peak from 32.0 to 40.8 MiB). Blocks keep their neighbour policies."""
    compress_as_fit(model, compression, _outside(recompute), sample=sample)
    for entry in recompute:
        if "+" in entry:
            for name in _members(entry):
                restore(model.get_submodule(name))


def _approximate(compression: CompressionConfig | None) -> bool:
    """Compression that changes the gradients (anything but None and the exact policies)."""
    return compression is not None and compression != EXACT_POLICIES


class BudgetExceededError(MemoryError):
    """A fitted step's measured device total exceeded its budget."""


@dataclass(frozen=True)
class FitChoice:
    """One combination of levers and what it measured on the calibration batch.

    ``micro_batches``: chunks per batch; ``recompute``: the blocks and regions recomputed
    (:func:`~actcomp.levers.checkpoint_blocks` entries; empty: none);
    ``step_in_backward``: the optimizer step runs in backward (``state_dtype``: its moments
    stored in that dtype, approximate; None: the parameters' dtype); ``compression``: the
    compression of every trainable layer (None: plain autograd). ``total_bytes``: resident
    bytes (the optimizer state as this choice holds it) + the step's measured peak; ``peak_bytes``: that peak; ``step_ms``: the step's
    measured wall time (forward, backward and update); ``grad_error``: ||g - g_plain|| /
    ||g_plain|| on the calibration batch. ``grad_bias`` (approximate compression only; None
    where the batch is too small to split): the median over the weight tensors of the error
    that every step repeats (:func:`~actcomp.memory.error.median_layer_bias`, the batch in up
    to 8 chunks against plain autograd on the same chunks), or micro-batching's own
    ``grad_error`` through a train-mode BatchNorm if larger. ``bounded_error`` is what
    ``max_error`` bounds: ``grad_bias`` where measured, else ``grad_error``.
    """

    micro_batches: int
    recompute: tuple[str, ...]
    step_in_backward: bool
    compression: CompressionConfig | None
    total_bytes: int
    peak_bytes: int
    step_ms: float
    grad_error: float
    state_dtype: torch.dtype | None = None
    grad_bias: float | None = None

    @property
    def bounded_error(self) -> float:
        """The error fit bounds by ``max_error``: ``grad_bias`` where measured, else ``grad_error``."""
        return self.grad_error if self.grad_bias is None else self.grad_bias

    @property
    def exact(self) -> bool:
        """No approximate compression, no gradient error and the optimizer state in full precision."""
        return not _approximate(self.compression) and self.grad_error == 0.0 and self.state_dtype is None

    def describe(self) -> str:
        parts = []
        if self.micro_batches > 1:
            parts.append(f"{self.micro_batches} micro-batches")
        if self.recompute:
            regions = sum("+" in entry for entry in self.recompute)
            blocks = len(self.recompute) - regions
            parts.append("recompute " + " + ".join(
                f"{n} {what}{'s' if n > 1 else ''}" for n, what in ((blocks, "block"), (regions, "region")) if n
            ))
        if self.step_in_backward:
            parts.append("step in backward" + (f" (state {str(self.state_dtype).removeprefix('torch.')})" if self.state_dtype else ""))
        where = " outside them" if self.recompute else ""
        if self.compression == EXACT_POLICIES:
            parts.append(f"exact policies{where}")
        elif self.compression is not None:
            parts.append(f"{self.compression.method} eps {self.compression.eps:g}{where}")
        return ", ".join(parts) or "plain"

    def levers(self) -> dict[str, Any]:
        """The levers of this choice, JSON-ready (what :func:`fit`'s ``levers=`` takes, e.g. to
        resume a run with the levers it was fitted with)."""
        return {
            "micro_batches": self.micro_batches,
            "recompute": list(self.recompute),
            "step_in_backward": self.step_in_backward,
            "compression": None if self.compression is None else self.compression.as_dict(),
            "state_dtype": None if self.state_dtype is None else str(self.state_dtype).removeprefix("torch."),
        }

    @classmethod
    def from_levers(cls, levers: Mapping[str, Any]) -> "FitChoice":
        """The (unmeasured) choice that :meth:`levers` describes; ValueError when malformed."""
        try:
            compression = levers["compression"]
            dtype = levers.get("state_dtype")
            state_dtype = None if dtype is None else getattr(torch, str(dtype))
            if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
                raise ValueError(f"state_dtype {dtype!r} is not a floating-point dtype")
            return cls(
                int(levers["micro_batches"]), tuple(str(b) for b in levers["recompute"]), bool(levers["step_in_backward"]),
                None if compression is None else CompressionConfig.from_dict(compression), 0, 0, 0.0, 0.0, state_dtype,
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not a description of fit's levers ({type(error).__name__}: {error})") from None


@dataclass
class FitReport:
    """What :func:`fit` measured and chose. All sizes in bytes.

    ``resident_bytes`` = ``weights_bytes`` + ``buffers_bytes`` + ``optimizer_state_bytes`` +
    ``batch_bytes``; every candidate's total is that plus its measured peak. ``plain`` is the
    plain step's figures, ``chosen`` the combination applied, ``candidates`` everything
    measured, ``measured_total_bytes`` the total of the first real step (None before it).
    """

    budget_bytes: int
    weights_bytes: int
    buffers_bytes: int
    optimizer_state_bytes: int
    batch_bytes: int
    plain: FitChoice
    chosen: FitChoice
    candidates: list[FitChoice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measured_total_bytes: int | None = None
    max_error: float = 0.0
    headroom: float = 0.0

    def fits(self, choice: FitChoice) -> bool:
        """Within the budget (compressed choices with ``headroom`` to spare) and ``max_error``
        (its :attr:`FitChoice.bounded_error`; approximate compression never at max_error 0)."""
        limit = int(self.budget_bytes * (1.0 - self.headroom)) if _approximate(choice.compression) else self.budget_bytes
        if _approximate(choice.compression) and self.max_error == 0.0:
            return False  # max_error 0: exact levers only (a bias measured as 0 is not exactness)
        return choice.total_bytes <= limit and choice.bounded_error <= self.max_error

    @property
    def resident_bytes(self) -> int:
        return self.weights_bytes + self.buffers_bytes + self.optimizer_state_bytes + self.batch_bytes

    def table(self) -> str:
        header = ["levers", "total", "peak", "total/plain", "time/plain", "grad error", "layer bias", ""]
        rows = []
        for c in sorted(self.candidates, key=lambda c: (c.total_bytes, c.step_ms)):
            rows.append([
                c.describe(), format_bytes(c.total_bytes), format_bytes(c.peak_bytes),
                f"{c.total_bytes / self.plain.total_bytes:.3f}", f"{c.step_ms / self.plain.step_ms:.2f}x",
                f"{c.grad_error:.3g}", "" if c.grad_bias is None else f"{c.grad_bias:.3g}",
                "<- chosen" if c == self.chosen else ("fits" if self.fits(c) else ""),
            ])
        lines = [
            f"budget {format_bytes(self.budget_bytes)}; resident {format_bytes(self.resident_bytes)} (weights "
            f"{format_bytes(self.weights_bytes)}, buffers {format_bytes(self.buffers_bytes)}, optimizer state "
            f"{format_bytes(self.optimizer_state_bytes)}, batch {format_bytes(self.batch_bytes)})",
            aligned_table(header, rows),
            f"chosen: {self.chosen.describe()}: total {format_bytes(self.chosen.total_bytes)} "
            f"({self.chosen.total_bytes / self.plain.total_bytes:.3f} of plain {format_bytes(self.plain.total_bytes)}), "
            f"{self.chosen.step_ms / self.plain.step_ms:.2f}x plain's step time",
        ]
        if self.measured_total_bytes is not None:
            lines.append(f"first real step: total {format_bytes(self.measured_total_bytes)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class _Applied:
    """The levers of one choice applied to a model and its optimizer; ``step(batch)`` trains."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, choice: FitChoice, loss_fn: Callable | None, sample: Any, frozen_batchnorm: bool
    ) -> None:
        self.model, self.optimizer, self.choice, self.loss_fn = model, optimizer, choice, loss_fn
        self.frozen_batchnorm = frozen_batchnorm
        self.recompute: Recompute | None = None
        self.in_backward: StepInBackward | None = None
        if choice.compression is not None:  # inside a recomputed block nothing is kept: no use compressing there
            _compress_outside(model, choice.compression, choice.recompute, _inputs_of(sample, loss_fn))
        if choice.recompute:
            self.recompute = checkpoint_blocks(model, list(choice.recompute))
        if choice.step_in_backward:
            self.in_backward = optimizer_in_backward(model, optimizer, state_dtype=choice.state_dtype)

    def step(self, batch: Any) -> Tensor:
        with freeze_batchnorm(self.model) if self.frozen_batchnorm else contextlib.nullcontext():
            return self._step(batch)

    def backward(self, batch: Any) -> None:
        """Forward and backward only (gradients accumulated into .grad, no update)."""
        with freeze_batchnorm(self.model) if self.frozen_batchnorm else contextlib.nullcontext():
            if self.choice.micro_batches > 1:
                microbatch_step(self.model, lambda m, c: step_loss(m, c, self.loss_fn), batch, self.choice.micro_batches)
            else:
                step_loss(self.model, batch, self.loss_fn).backward()

    def _step(self, batch: Any) -> Tensor:
        if self.in_backward is None:
            self.optimizer.zero_grad(set_to_none=True)
        loss = microbatch_step(
            self.model, lambda m, chunk: step_loss(m, chunk, self.loss_fn), batch, self.choice.micro_batches, in_backward=self.in_backward
        ) if self.choice.micro_batches > 1 else self._one(batch)
        if self.in_backward is None:
            self.optimizer.step()
        return loss

    def state_in_place(self) -> bool:
        """The optimizer's state exists already (or it keeps none): a step allocates no more of it."""
        if self.in_backward is not None:
            optimizers = list(self.in_backward.optimizers.values())
            if any(o.state for o in optimizers):
                return True
        elif self.optimizer.state:
            return True
        return _optimizer_state_bytes(self.optimizer) == 0

    def state_bytes(self) -> int:
        """Bytes of the optimizer state this choice holds: the per-parameter optimizers' (in
        their storage dtype) with the step in backward, else the optimizer's; estimated from a
        copy stepped once while no state exists yet."""
        if self.in_backward is not None and any(o.state for o in self.in_backward.optimizers.values()):
            return _held_state_bytes(self.in_backward.optimizers.values())
        return _optimizer_state_bytes(self.optimizer)

    def _one(self, batch: Any) -> Tensor:
        loss = step_loss(self.model, batch, self.loss_fn)
        loss.backward()
        return loss.detach()

    def remove(self) -> None:
        if self.in_backward is not None and not self.in_backward.removed:
            self.in_backward.remove()
        if self.recompute is not None:
            self.recompute.remove()
        if self.choice.compression is not None:
            restore(self.model)


class FittedStep:
    """One training step (forward, backward, update) with the levers :func:`fit` chose.

    Call it with a batch in the calibration batch's form: ``step(x, y)``, ``step((x, y))``,
    ``step(batch_dict)`` or ``step(**batch_dict)``; it returns the batch's mean loss (detached).
    The first call on which the optimizer's state already exists (the second call for Adam,
    which creates its state in its first step; the first for stateless SGD: as calibrated) is
    measured (allocator peak + resident bytes) and checked against the budget: over it, :class:`BudgetExceededError` is raised after the step. ``report`` says
    what was measured and chosen; ``remove()`` returns the model and optimizer to plain use.
    """

    def __init__(self, applied: _Applied, report: FitReport) -> None:
        self._applied = applied
        self.report = report

    @property
    def model(self) -> nn.Module:
        return self._applied.model

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.report.measured_total_bytes is not None or not self._applied.state_in_place():
            return self._applied.step(_batch_of(args, kwargs))  # measured already, or the optimizer creates its state in this step
        loss, total = self.measured(*args, **kwargs)
        if total is None:  # no allocator figure on this platform: nothing to check
            self.report.notes.append("the first step's peak could not be measured (no allocator figure)")
            return loss
        self.report.measured_total_bytes = total
        if total > self.report.budget_bytes:
            raise BudgetExceededError(
                f"the fitted step's measured device total {format_bytes(total)} exceeds the "
                f"budget {format_bytes(self.report.budget_bytes)} (calibrated at {format_bytes(self.report.chosen.total_bytes)}): "
                "this batch keeps more than the calibration batch; fit again on a representative batch or with more headroom"
            )
        return loss

    def measured(self, *args: Any, **kwargs: Any) -> tuple[Tensor, int | None]:
        """One training step on the batch, measured: its loss and its device total, resident
        bytes (weights, buffers, the optimizer state as held, the batch) + the allocator's peak
        above them during the step (None where the platform gives no allocator figure). For
        checking a fitted step on batches other than the calibration one; nothing is raised."""
        batch = _batch_of(args, kwargs)
        params = list(self.model.parameters())
        device = params[0].device if params else torch.device("cpu")
        result: list[Tensor] = []
        # the previous step's gradients go before the window: the peak above the baseline is
        # then above the resident bytes alone (a gradient freed inside the window would hide it)
        self.model.zero_grad(set_to_none=True)
        peak, _ = _peak_of(lambda: result.append(self._applied.step(batch)), device)
        resident = self.report.weights_bytes + self.report.buffers_bytes + self._applied.state_bytes() + batch_bytes(batch)
        return result[0], None if peak is None else resident + peak

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The state dict of the optimizer given to :func:`fit`, as a plain loop would leave it.

        With the step in backward the state lives in one optimizer per parameter; it is
        gathered here into the given optimizer (its tensors shared, in the dtype they are
        stored in) so that ``torch.save(step.optimizer_state_dict(), path)`` and, in a resumed
        run, ``optimizer.load_state_dict(torch.load(path))`` before fitting again continue
        the same optimization (the step in backward takes an optimizer's state over)."""
        handle = self._applied.in_backward
        if handle is not None:
            for p, per_parameter in handle.optimizers.items():
                if p in per_parameter.state:
                    self._applied.optimizer.state[p] = per_parameter.state[p]
        return self._applied.optimizer.state_dict()

    def remove(self) -> None:
        """Undo the levers: compression restored, recompute and the step in backward removed."""
        self._applied.remove()


def _outside(blocks: Sequence[str]) -> Any:
    """The layer selection a compression with recompute of ``blocks`` applies to: the layers
    outside them (inside a recomputed block nothing is kept), or ``"all"`` without recompute."""
    return (lambda name, _: not _inside(name, blocks)) if blocks else "all"


def _inside(name: str, blocks: Sequence[str]) -> bool:
    """``name`` is one of ``blocks`` (or a member of one of its regions) or a module within one."""
    return any(name == b or name.startswith(f"{b}.") for entry in blocks for b in _members(entry))


def _batch_of(args: tuple, kwargs: dict) -> Any:
    """A step's batch from its call: keyword arguments (a dict batch), one argument, or a tuple."""
    if kwargs and args:
        raise TypeError("give the batch either as positional or as keyword arguments, not both")
    return kwargs if kwargs else (args[0] if len(args) == 1 else tuple(args))


def _held_state_bytes(optimizers: Any) -> int:
    """Bytes of the distinct storages of the state tensors ``optimizers`` hold."""
    storages = {
        (str(v.device), v.untyped_storage().data_ptr()): v.untyped_storage().nbytes()
        for o in optimizers for state in o.state.values() for v in state.values() if isinstance(v, Tensor)
    }
    return sum(storages.values())


def _grads(model: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def _relative_error(grads: list[Tensor | None], reference: list[Tensor | None]) -> float:
    num = den = 0.0
    for g, r in zip(grads, reference):
        r = torch.zeros(()) if r is None else r.double()
        g = torch.zeros_like(r) if g is None else g.double()
        num += float((g - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


class _Calibration:
    """Measures combinations of levers on copies of the model and optimizer."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, loss_fn: Callable | None, timing_steps: int, frozen_batchnorm: bool
    ) -> None:
        self.model, self.optimizer, self.batch, self.loss_fn = model, optimizer, batch, loss_fn
        self.frozen_batchnorm = frozen_batchnorm
        self.timing_steps = timing_steps
        params = list(model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        self.weights = sum(p.numel() * p.element_size() for p in params)
        self.buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        self.state = _optimizer_state_bytes(optimizer)
        self.batch_bytes = batch_bytes(batch)
        self.reference: list[Tensor | None] | None = None
        self.measured: dict[tuple, FitChoice] = {}
        self.failed: dict[tuple, str] = {}
        self.errors: dict[tuple, float | None] = {}
        self.samples: dict[tuple, list[float]] = {}

    @property
    def resident(self) -> int:
        return self.weights + self.buffers + self.state + self.batch_bytes

    def _copies(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A deep copy of the model and an optimizer of the same class, settings and state over
        the copy's parameters."""
        model = copy.deepcopy(self.model)
        names = {id(p): n for n, p in self.model.named_parameters()}
        copied = dict(model.named_parameters())
        try:
            groups = [{**g, "params": [copied[names[id(p)]] for p in g["params"]]} for g in self.optimizer.param_groups]
        except KeyError:
            raise ValueError("the optimizer holds a parameter that is not the model's: fit needs the model's own optimizer") from None
        optimizer = rebuilt_optimizer(self.optimizer, groups)
        for p, state in self.optimizer.state.items():
            optimizer.state[copied[names[id(p)]]] = copy.deepcopy(state)
        return model, optimizer

    def plain_gradient(self) -> list[Tensor | None]:
        if self.reference is None:
            model, optimizer = self._copies()
            model.zero_grad(set_to_none=True)
            _Applied(model, optimizer, _PLAIN, self.loss_fn, self.batch, self.frozen_batchnorm).backward(self.batch)
            self.reference = _grads(model)
        return self.reference

    def measure(
        self,
        micro_batches: int,
        recompute: tuple[str, ...],
        in_backward: bool,
        compression: CompressionConfig | None,
        state_dtype: torch.dtype | None = None,
    ) -> FitChoice | None:
        """Measure one combination (cached); None when it cannot run on this batch: a micro-batch
        count whose chunks a module rejects (one-sample chunks through a BatchNorm in train mode
        on a 1x1 map), recorded in ``failed`` with the error."""
        key = (micro_batches, recompute, in_backward, compression, state_dtype)
        if key in self.measured:
            return self.measured[key]
        if key in self.failed:
            return None
        if micro_batches == 1:
            return self._measure(key)
        try:
            return self._measure(key)
        except (RuntimeError, ValueError) as error:
            self.failed[key] = str(error).splitlines()[0] if str(error) else type(error).__name__
            return None

    def _error(self, micro_batches: int, recompute: tuple[str, ...], compression: CompressionConfig | None) -> float:
        """The gradient error of micro-batching and compression, measured once per combination
        on a fresh copy. Recompute and the step in backward change no gradient, but with
        recompute only the layers outside the blocks are compressed: it is part of the key then."""
        recompute = recompute if compression is not None else ()
        key = (micro_batches, recompute, compression)
        if key not in self.errors:
            model, optimizer = self._copies()
            probe = FitChoice(micro_batches, recompute, False, compression, 0, 0, 0.0, 0.0)
            applied = _Applied(model, optimizer, probe, self.loss_fn, self.batch, self.frozen_batchnorm)
            model.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                applied.backward(self.batch)
            exact = not _approximate(compression) and (micro_batches == 1 or self.frozen_batchnorm or not batch_statistics_modules(model))
            self.errors[key] = 0.0 if exact else _relative_error(_grads(model), self.plain_gradient())
            applied.remove()
        return self.errors[key]

    def _bias(self, micro_batches: int, recompute: tuple[str, ...], compression: CompressionConfig) -> float | None:
        """The layer bias of approximate compression (:func:`median_layer_bias` over the
        calibration batch in n = min(8, size // (2k)) chunks, each run as the choice's k
        micro-batches, against plain autograd on the same chunks), or micro-batching's own
        error through a train-mode BatchNorm if larger; None where n < 2 (then ``max_error``
        bounds ``grad_error``)."""
        key = ("bias", micro_batches, recompute, compression)
        if key not in self.errors:
            chunks = min(8, _batch_size(self.batch) // (2 * micro_batches))
            value: float | None = None
            if chunks >= 2:
                model, _ = self._copies()
                estimate = copy.deepcopy(model)
                _compress_outside(estimate, compression, recompute, _inputs_of(self.batch, self.loss_fn))
                frozen = (freeze_batchnorm(model), freeze_batchnorm(estimate)) if self.frozen_batchnorm else ()
                with contextlib.ExitStack() as stack, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for context in frozen:
                        stack.enter_context(context)
                    try:
                        value = median_layer_bias(model, estimate, self.batch, self.loss_fn, chunks=chunks, micro_batches=micro_batches)
                    except ValueError:  # no trained weight tensor with a mean gradient: no bias to measure
                        value = None
                if value is not None:
                    value = max(value, self._error(micro_batches, (), None))
            self.errors[key] = value
        return self.errors[key]

    def _measure(self, key: tuple) -> FitChoice:
        micro_batches, recompute, in_backward, compression, state_dtype = key
        error = self._error(micro_batches, recompute, compression)
        bias = self._bias(micro_batches, recompute, compression) if _approximate(compression) else None
        # memory and time of the real step (update included) on a fresh copy
        model, optimizer = self._copies()
        choice = FitChoice(micro_batches, recompute, in_backward, compression, 0, 0, 0.0, error, state_dtype, bias)
        applied = _Applied(model, optimizer, choice, self.loss_fn, self.batch, self.frozen_batchnorm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            applied.step(self.batch)  # warm-up: optimizer state and lazy buffers exist from here on
            model.zero_grad(set_to_none=True)  # as in FittedStep: the window's baseline is the resident bytes
            peak, _ = _peak_of(lambda: applied.step(self.batch), self.device)
            times = self._times(applied)
            resident = self.resident - self.state + applied.state_bytes()  # the state as this choice holds it
        applied.remove()
        peak = peak or 0
        result = dataclasses.replace(choice, total_bytes=resident + peak, peak_bytes=peak, step_ms=statistics.median(times))
        self.measured[key] = result
        self.samples[key] = times
        return result

    def _times(self, applied: _Applied) -> list[float]:
        """Wall times in ms of ``timing_steps`` steps (the device synchronised around each)."""
        times = []
        for _ in range(self.timing_steps):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            applied.step(self.batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def retime(self, choices: list[FitChoice], rounds: int) -> None:
        """Time ``choices`` again in ``rounds`` alternating rounds (drift and load on the host hit
        all alike) and set each one's step_ms to the median of all its samples."""
        for _ in range(rounds):
            for choice in choices:
                model, optimizer = self._copies()
                applied = _Applied(model, optimizer, choice, self.loss_fn, self.batch, self.frozen_batchnorm)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    applied.step(self.batch)  # warm-up
                    self.samples[_key(choice)] += self._times(applied)
                applied.remove()
        for choice in choices:
            self.measured[_key(choice)] = dataclasses.replace(choice, step_ms=statistics.median(self.samples[_key(choice)]))


def _key(choice: FitChoice) -> tuple:
    return (choice.micro_batches, choice.recompute, choice.step_in_backward, choice.compression, choice.state_dtype)


_PLAIN = FitChoice(1, (), False, None, 0, 0, 0.0, 0.0)


def _micro_batch_counts(size: int) -> list[int]:
    counts, k = [], 1
    while k <= size:
        counts.append(k)
        k *= 2
    if counts[-1] != size:
        counts.append(size)
    return counts


def _fewest_fitting(measure: Callable[[int], FitChoice | None], counts: list[int], limit: int) -> FitChoice | None:
    """The choice with the fewest micro-batches whose measured total is within ``limit``, or None.

    Every count is tried in ascending order until one fits: the total does not always fall as
    the count grows (with the step in backward, one micro-batch never holds all the gradients,
    but two or more accumulate them all before the last chunk's backward), so no count is
    skipped by a search that assumes it does. ``measure`` returns None for a count that cannot
    run (e.g. one-sample chunks through a BatchNorm in train mode)."""
    for k in counts:
        choice = measure(k)
        if choice is not None and choice.total_bytes <= limit:
            return choice
    return None


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    budget: int | float | str,
    batch: Any,
    loss_fn: Callable | None = None,
    *,
    max_error: float = 0.1,
    eps_grid: Sequence[float] = (0.99, 0.95, 0.9),
    method: str = "hosvd",
    headroom: float = 0.1,
    allow: Sequence[str] = ("micro_batches", "recompute", "step_in_backward", "exact_policies", "compression"),
    freeze_batchnorm: bool = False,
    timing_steps: int = 2,
    retime_rounds: int = 2,
    levers: Mapping[str, Any] | FitChoice | None = None,
) -> FittedStep:
    """Fit one training step of ``model`` with ``optimizer`` into ``budget`` bytes of device memory.

    ``budget`` (bytes, or ``"512MiB"``) is the device total of one step: resident bytes
    (weights + buffers + optimizer state + the batch) + the step's allocator peak above them.
    ``batch`` is a representative batch in the form the step will get (a tensor, a tuple
    ``(inputs..., targets)`` with ``loss_fn(model(*inputs), targets)``, or a dict passed as
    keyword arguments whose output's ``.loss`` is the loss). Each combination of the levers in
    ``allow`` is measured on copies of the model and optimizer (one warm-up, one profiled and
    ``timing_steps`` timed steps each, then the four fastest that fit and plain again in
    ``retime_rounds`` alternating rounds; the originals are left as they were and take no update):
    if plain autograd fits, the step is plain; otherwise, among the exact combinations
    (micro-batches k in powers of two, recompute of :func:`~actcomp.levers.auto_blocks` alone
    and with the regions of :func:`~actcomp.levers.recompute.auto_regions`, whose modules then
    run without neighbour policies, the step in backward for the element-wise optimizers; where a combination needs micro-batches
    or fits with none, the same with :data:`EXACT_POLICIES` at fewer micro-batches) and the
    compressed ones, ``method`` at each eps of ``eps_grid``, whose
    :attr:`FitChoice.bounded_error` (the median layer bias over the batch in chunks, see the
    module docstring) is at most ``max_error`` and which fit within (1 - ``headroom``) of the
    budget, the one with the least measured step time. ``freeze_batchnorm=True`` runs every BatchNorm on its running
    statistics (eval mode, affine parameters still trained: the usual fine-tuning setting; the
    plain reference too), which makes micro-batching exact; otherwise a BatchNorm in train mode
    normalises each micro-batch by its own statistics, and the measured gradient error of
    micro-batching must stay within ``max_error`` like compression's. ``"bf16_state"`` in
    ``allow`` (opt-in, approximate) adds the step in backward with the optimizer's moments
    stored in bfloat16 (:func:`~actcomp.levers.optimizer_in_backward` ``state_dtype``): Adam's
    state takes half the bytes; each candidate's total counts the state as it holds it. The choice is applied to ``model`` and ``optimizer`` and
    returned as a :class:`FittedStep`; ``step.report`` lists every measured combination. An
    infeasible budget is a ValueError naming the smallest total measured and what it is made of.
    ``levers`` (a :meth:`FitChoice.levers` dict, or a FitChoice) skips the search: those levers
    are measured beside plain and applied if they fit, e.g. when a run resumes with the levers it
    was fitted with (a new search could time another combination fastest).
    """
    budget_bytes = parse_bytes(budget)
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom!r}")
    if not 0.0 <= max_error:
        raise ValueError(f"max_error must be >= 0, got {max_error!r}")
    known = {"micro_batches", "recompute", "step_in_backward", "exact_policies", "compression", "bf16_state"}
    if set(allow) - known:
        raise ValueError(f"allow names unknown levers {sorted(set(allow) - known)}; known: {sorted(known)}")
    size = _batch_size(batch)
    calibration = _Calibration(model, optimizer, batch, loss_fn, timing_steps, freeze_batchnorm)
    plain = calibration.measure(1, (), False, None)
    notes: list[str] = []

    def report(chosen: FitChoice) -> FitReport:
        return FitReport(
            budget_bytes, calibration.weights, calibration.buffers, calibration.state, calibration.batch_bytes,
            plain, chosen, list(calibration.measured.values()), notes, max_error=max_error, headroom=headroom,
        )

    if levers is not None:
        given = levers if isinstance(levers, FitChoice) else FitChoice.from_levers(levers)
        chosen = calibration.measure(given.micro_batches, given.recompute, given.step_in_backward, given.compression, given.state_dtype)
        if chosen is None or not report(chosen).fits(chosen):
            what = "cannot run on this batch" if chosen is None else f"measure {format_bytes(chosen.total_bytes)}, gradient error {chosen.bounded_error:.3g}"
            raise ValueError(f"the given levers ({given.describe()}) {what}: not within {format_bytes(budget_bytes)} and max_error {max_error:g}")
        notes.append("levers given: no search")
        return FittedStep(_Applied(model, optimizer, chosen, loss_fn, batch, freeze_batchnorm), report(chosen))
    if plain.total_bytes <= budget_bytes:
        notes.append("plain autograd fits the budget: the step is plain")
        return FittedStep(_Applied(model, optimizer, plain, loss_fn, batch, freeze_batchnorm), report(plain))
    counts = _micro_batch_counts(size) if "micro_batches" in allow else [1]
    recompute_sets = _recompute_sets(calibration) if "recompute" in allow else [()]
    in_backward_ok = bool({"step_in_backward", "bf16_state"} & set(allow)) and type(optimizer) in EXACT_OPTIMIZERS
    if {"step_in_backward", "bf16_state"} & set(allow) and not in_backward_ok:
        notes.append(f"the step in backward is not exact for {type(optimizer).__name__}: not considered")
    if batch_statistics_modules(model) and len(counts) > 1 and not freeze_batchnorm:
        notes.append("BatchNorm in train mode sees each micro-batch's statistics: its gradient error is measured and bounded by max_error")
    compressed_limit = int(budget_bytes * (1.0 - headroom))
    fits = report(plain).fits

    steps: list[tuple[bool, torch.dtype | None]] = [(False, None)]
    if in_backward_ok and "step_in_backward" in allow:
        steps.append((True, None))
    if in_backward_ok and "bf16_state" in allow and calibration.state > 0:  # opt-in: approximate updates
        steps.append((True, torch.bfloat16))
    combos = [(r, *s) for r in recompute_sets for s in steps]
    # compressed combinations compress only the layers outside the recomputed blocks: none there, none to try
    layers = select_layers(model, "all")
    compressed_combos = [c for c in combos if not c[0] or any(not _inside(n, c[0]) for n in layers)]
    for recompute, in_backward, state_dtype in combos:  # the fewest micro-batches that fit, per combination
        found = _fewest_fitting(lambda k: calibration.measure(k, recompute, in_backward, None, state_dtype), counts, budget_bytes)
        if "exact_policies" in allow and (recompute, in_backward, state_dtype) in compressed_combos and (found is None or found.micro_batches > 1):
            # the exact policies keep less at each count: tried only below the count found without them
            fewer = [k for k in counts if found is None or k < found.micro_batches]
            _fewest_fitting(lambda k: calibration.measure(k, recompute, in_backward, EXACT_POLICIES, state_dtype), fewer, budget_bytes)
    if "compression" in allow:
        fastest_exact = min((c.step_ms for c in calibration.measured.values() if fits(c)), default=math.inf)
        for eps in sorted(eps_grid, reverse=True):
            config = CompressionConfig(method, eps)
            first = calibration.measure(1, (), False, config)
            if first.step_ms >= fastest_exact:
                continue  # compression is only used where it is needed or faster
            for recompute, in_backward, state_dtype in compressed_combos:
                _fewest_fitting(lambda k: calibration.measure(k, recompute, in_backward, config, state_dtype), counts, compressed_limit)
    for (k, recompute, in_backward, compression, state_dtype), error in calibration.failed.items():
        what = FitChoice(k, recompute, in_backward, compression, 0, 0, 0.0, 0.0, state_dtype).describe()
        notes.append(f"{what}: cannot run on this batch ({error}): not considered")
    for choice in calibration.measured.values():
        if _approximate(choice.compression) and choice.bounded_error > max_error and choice.total_bytes <= compressed_limit:
            what = "gradient error" if choice.grad_bias is None else "layer bias"
            notes.append(f"{choice.describe()}: {what} {choice.bounded_error:.3g} > max_error {max_error:g}")
    # every measured combination that fits is a candidate, not only each search's last:
    # the fastest of them is applied
    feasible = [c for c in calibration.measured.values() if fits(c)]
    if len(feasible) > 1 and retime_rounds > 0:  # the fastest few against plain, interleaved
        shortlist = sorted(feasible, key=lambda c: c.step_ms)[:4]
        calibration.retime([calibration.measured[_key(plain)], *shortlist], retime_rounds)
        plain = calibration.measured[_key(plain)]
        feasible = [calibration.measured[_key(c)] for c in feasible]
    if not feasible:
        raise ValueError(_infeasible(calibration, budget_bytes, compressed_limit, allow, max_error))
    chosen = min(feasible, key=lambda c: (c.step_ms, c.total_bytes))
    return FittedStep(_Applied(model, optimizer, chosen, loss_fn, batch, freeze_batchnorm), report(chosen))


def _recompute_sets(calibration: _Calibration) -> list[tuple[str, ...]]:
    """What fit's recompute lever tries: nothing; every block of
    :func:`~actcomp.levers.auto_blocks`; and, where there are any, those and every region of
    :func:`~actcomp.levers.recompute.auto_regions` (traced on a copy of the model on the
    calibration batch's inputs, so the model itself runs no forward). Both are measured: a
    region's recompute holds all of its saved tensors at once in backward, so where the step
    peaks in the region itself recomputing it can raise the peak."""
    blocks = tuple(auto_blocks(calibration.model))
    model, _ = calibration._copies()
    regions = tuple(auto_regions(model, _inputs_of(calibration.batch, calibration.loss_fn), blocks))
    del model
    return list(dict.fromkeys([(), blocks, blocks + regions]))


def _infeasible(calibration: _Calibration, budget_bytes: int, compressed_limit: int, allow: Sequence[str], max_error: float) -> str:
    """Why nothing fits: the smallest total measured within max_error and what it is made of;
    and, when some combination fits the bytes only with a larger gradient error, which one."""
    measured = list(calibration.measured.values())
    within = [c for c in measured if c.bounded_error <= max_error] or measured
    smallest = min(within, key=lambda c: c.total_bytes)
    resident = smallest.total_bytes - smallest.peak_bytes
    text = (
        f"no combination of {', '.join(allow)} fits {format_bytes(budget_bytes)} within max_error {max_error:g}: the smallest "
        f"total measured is {format_bytes(smallest.total_bytes)} ({smallest.describe()}): resident "
        f"{format_bytes(resident)} (weights {format_bytes(calibration.weights)}, optimizer state "
        f"{format_bytes(resident - calibration.resident + calibration.state)}, buffers {format_bytes(calibration.buffers)}, batch "
        f"{format_bytes(calibration.batch_bytes)}) + peak {format_bytes(smallest.peak_bytes)}"
    )
    too_inexact = [c for c in measured if c.bounded_error > max_error and c.total_bytes <= (compressed_limit if _approximate(c.compression) else budget_bytes)]
    if too_inexact:
        best = min(too_inexact, key=lambda c: c.bounded_error)
        text += (
            f"; {best.describe()} fits at {format_bytes(best.total_bytes)} but with gradient error {best.bounded_error:.3g}"
            + ("" if _approximate(best.compression) else " (micro-batches through BatchNorm in train mode: freeze_batchnorm=True makes them exact)")
        )
    return text


def _batch_size(batch: Any) -> int:
    size = _size_along_dim0(batch)
    if size is None:
        raise ValueError("the batch holds no tensor with a batch dimension (dim 0)")
    return size
