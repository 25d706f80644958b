"""Tucker factors from fixed bases: an HOSVD once, then projections only (method ``"oneshot"``).

The subspaces of a layer's non-sample modes (a convolution's channel and spatial modes, a
Linear's features) drift slowly from step to step; the sample modes (the batch, a Linear's
leading modes) do not carry over, batches being unrelated. So the F non-sample modes get bases
from one sequentially truncated HOSVD (:func:`~actcomp.linalg.decompose.hosvd` with the fixed
modes first), at calibration (:meth:`ProjectionState.observe` over several batches) or on the
first step, and every later step only projects: Y = X x_n U_n^T over the fixed modes (the
orthogonal projection onto the product of the mode subspaces: the order of the products
changes the cost, not Y, so the order with the fewest estimated multiply-adds is used,
:func:`projection_order`);
then each sample mode is truncated at eps from its small Gram matrix (the core is already small:
B x B for a convolution's batch), as ``hosvd`` does.

Each step records, as device tensors (no host read), the fraction of energy the fixed bases
keep, ``kept = ||Y||^2 / ||X||^2``, and the explained energy ||S||^2 / ||X||^2 of the whole
factorisation. A fresh HOSVD keeps kept >= eps^F (each of its F truncations keeps eps of what it
truncates); when kept falls below (eps - tolerance)^F (as if each fixed mode kept eps -
tolerance) the bases are refreshed: one HOSVD of that step's input at eps, its ranks re-chosen
(grown as needed), and that step keeps the HOSVD's factors. On the host the check runs every
step, so every step keeps ||X - X~||^2 <= (1 - (eps - tolerance)^F eps^S) ||X||^2 (S sample
modes; hosvd's bound is 1 - eps^(F+S)). On an accelerator the smallest kept since the last check stays on the device and
is read every ``check_every`` steps (one sync per check; a shortfall between checks is counted
then and refreshes the bases on the checking step). The sample modes' ranks are read on the
host every step (their Gram matrices are eigen-decomposed there, as in ``hosvd``'s batch mode).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from actcomp.linalg.decompose import _leading_subspace, _safe_energy, hosvd, truncation_order
from actcomp.linalg.factors import Tucker, mode_product
from actcomp.linalg.numerics import (
    _FEW_SLICES,
    NonFiniteActivationError,
    Unfolding,
    check_eps,
    compute_dtype,
    device_scaled,
    finite_scaled,
    mode_gram,
    own,
    threads_for,
    unscaled,
)

__all__ = ["ProjectionState", "projected_tucker"]


def fixed_order(shape: torch.Size | tuple[int, ...], sample_modes: int) -> list[int]:
    """The order the fixed (non-sample) modes are truncated and projected in: hosvd's
    :func:`truncation_order` (smallest first) restricted to the modes after the sample modes."""
    return [n for n in truncation_order(shape) if n >= sample_modes]


_COPY_COST = 8  # multiply-adds that copying one element into a permuted layout costs (memory-bound)


def projection_order(shape: torch.Size | tuple[int, ...], ranks: dict[int, int]) -> list[int]:
    """The order of the mode products X x_n U_n^T over the fixed modes (n in ``ranks``, U_n of
    I_n x K_n) with the fewest estimated multiply-adds, following the layouts
    :class:`~actcomp.linalg.numerics.Unfolding` gives: a product costs K_n multiply-adds per
    element of the current tensor and shrinks it by K_n / I_n; a middle mode with many slices
    before it is first copied into a permuted layout (``_COPY_COST`` per element). A last mode
    is one matrix product whose result puts the mode first (the next mode is then last); a
    middle mode with few slices before it (the batch) is a batched product in place. On
    mobilenet_v2's 52 convolution inputs (batch 32, 96 px, random weights, eps 0.8) projecting
    the channel mode first instead of the last mode took 356 instead of 542 ms (1 thread);
    on a depthwise input whose channels barely truncate the last mode first is cheaper."""

    def cost(order: tuple[int, ...]) -> float:
        dims, axes, total = list(shape), list(range(len(shape))), 0.0
        for n in order:
            p, numel = axes.index(n), math.prod(dims)
            if 0 < p < len(dims) - 1 and (math.prod(dims[:p]) > _FEW_SLICES or dims[p] ** 2 > numel):
                total += _COPY_COST * numel
                dims, axes, p = [dims[p]] + dims[:p] + dims[p + 1 :], [n] + axes[:p] + axes[p + 1 :], 0
            total += numel * ranks[n]
            if p > 0 and math.prod(dims[p + 1 :]) == 1:  # comes out first
                dims, axes = [ranks[n]] + dims[:p] + dims[p + 1 :], [n] + axes[:p] + axes[p + 1 :]
            else:
                dims[p] = ranks[n]
        return total

    return list(min(itertools.permutations(sorted(ranks, reverse=True)), key=cost))


def _checks_every_step(x: Tensor) -> bool:
    """True on the host, where reading the energy check costs no sync (an accelerator defers it)."""
    return x.device.type == "cpu"


def _energy(t: Tensor) -> Tensor:
    """||t||^2 as a 0-d tensor (one BLAS dot product, no temporary)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


@dataclass
class ProjectionState:
    """Per-layer state of :func:`projected_tucker`: the fixed bases and what the steps recorded.

    ``bases[n]``: mode n's basis (I_n x K_n, orthonormal, in the compute dtype, on the input's
    device) for every fixed mode, projected in ``order``. ``steps``: factorisations;
    ``refreshes``: HOSVDs and calibrations (the first step, a change of shape, device or dtype,
    and each shortfall); ``shortfalls``: checks that found kept < (eps - tolerance)^F.
    ``kept``/``explained``: the latest step's ||Y||^2 / ||X||^2 after the fixed modes and
    ||S||^2 / ||X||^2 (device tensors, read only when asked). ``worst``: the smallest kept since
    the last check (on an accelerator; NaN when an input held NaN or Inf). ``calibration``: the
    summed Gram matrices while :meth:`observe` runs.
    """

    bases: dict[int, Tensor] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    steps: int = 0
    refreshes: int = 0
    shortfalls: int = 0
    since_check: int = 0
    kept: Tensor | None = None
    explained: Tensor | None = None
    worst: Tensor | None = None
    calibration: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def matches(self, x: Tensor, sample_modes: int) -> bool:
        """The bases fit x: one per fixed mode, of x's sizes, device and compute dtype."""
        dtype = compute_dtype(x)
        fixed = range(sample_modes, x.ndim)
        return sorted(self.bases) == list(fixed) and all(
            self.bases[n].shape[0] == x.shape[n] and self.bases[n].device == x.device and self.bases[n].dtype == dtype
            for n in fixed
        )

    def refresh(self, x: Tensor, eps: float, sample_modes: int) -> Tucker:
        """One HOSVD of x at eps, the fixed modes first (in :func:`fixed_order`), then the
        sample modes; its fixed factors become the bases; returns its factors."""
        fixed = fixed_order(x.shape, sample_modes)
        samples = [n for n in truncation_order(x.shape) if n < sample_modes]
        tucker = hosvd(x, eps, order=fixed + samples)
        dtype = compute_dtype(x)
        self._set_bases({n: own(tucker.factors[n], dtype) for n in fixed}, x.shape)
        total = _energy(x.detach().to(dtype)).clamp_min(torch.finfo(dtype).tiny)
        self.explained = _energy(tucker.core.to(dtype)) / total
        self.kept = None  # not computed (>= eps^F by the HOSVD's construction)
        return tucker

    def _set_bases(self, bases: dict[int, Tensor], shape: torch.Size) -> None:
        self.bases = bases
        self.order = projection_order(shape, {n: u.shape[1] for n, u in bases.items()})
        self.refreshes += 1
        self.since_check, self.worst = 0, None

    def start_calibration(self) -> None:
        """Forget the bases: :meth:`observe` builds new ones, pass after pass."""
        self.order, self.bases, self.calibration = [], {}, {}

    def observe(self, x: Tensor, eps: float, sample_modes: int, step: int) -> bool:
        """Calibration, pass ``step`` over the batches: add the Gram matrix of the ``step``-th
        fixed mode of x, projected on the bases fixed by the earlier passes, to the sum over
        the pass's batches (the Gram matrix of those batches stacked on the batch mode).
        Returns False when this state has no fixed mode left for that pass."""
        if step == 0 and not self.order:
            self.order = fixed_order(x.shape, sample_modes)
        if step >= len(self.order):
            return False
        mode = self.order[step]
        known = [(n, self.bases[n].shape[0]) for n in self.order[:step]]
        if mode in self.calibration:
            known.append((mode, self.calibration[mode].shape[0]))
        if len(self.order) != x.ndim - sample_modes or any(n >= x.ndim or x.shape[n] != size for n, size in known):
            raise ValueError(f"calibration batches must share their non-sample sizes, got an input of shape {tuple(x.shape)}")
        y = x.detach().to(compute_dtype(x))
        for n in self.order[:step]:
            y = mode_product(y, self.bases[n].T, n)
        gram = mode_gram(y, mode)
        self.calibration[mode] = gram if mode not in self.calibration else self.calibration[mode] + gram
        return True

    def finish(self, eps: float, step: int, shape: torch.Size) -> None:
        """End of calibration pass ``step``: the mode's basis from the summed Gram matrix,
        the smallest rank explaining eps of its trace (:func:`_leading_subspace`); after the
        last pass the bases are projected in :func:`projection_order` (``shape``: an input's)."""
        if step >= len(self.order) or self.order[step] not in self.calibration:
            return
        mode = self.order[step]
        gram = self.calibration.pop(mode)
        if not math.isfinite(float(gram.diagonal().sum())):
            raise NonFiniteActivationError("a calibration batch held NaN or Inf values (or its squares overflow)")
        self.bases[mode] = own(_leading_subspace(gram, eps), gram.dtype)
        if step == len(self.order) - 1:
            self._set_bases(self.bases, shape)

    def state_dict(self) -> dict:
        """Bases, order and counters as tensors and numbers (loadable with weights_only=True)."""
        return {
            "bases": {str(n): u for n, u in self.bases.items()}, "order": list(self.order), "steps": self.steps,
            "refreshes": self.refreshes, "shortfalls": self.shortfalls, "since_check": self.since_check,
        }

    @classmethod
    def from_state_dict(cls, data: dict) -> "ProjectionState":
        bases = {int(n): u for n, u in data.get("bases", {}).items()}
        order = [int(n) for n in data.get("order", [])]
        if not all(isinstance(u, Tensor) and u.ndim == 2 for u in bases.values()) or sorted(order) != sorted(bases):
            raise ValueError("oneshot state: 'bases' must map each mode of 'order' to a matrix")
        return cls(
            bases=bases, order=order, steps=int(data.get("steps", 0)), refreshes=int(data.get("refreshes", 0)),
            shortfalls=int(data.get("shortfalls", 0)), since_check=int(data.get("since_check", 0)),
        )


@torch.no_grad()
def projected_tucker(
    x: Tensor, eps: float, state: ProjectionState, sample_modes: int = 1, tolerance: float = 0.05, check_every: int = 8
) -> Tucker:
    """Tucker factors of x from the state's fixed bases (see the module doc).

    Without bases that fit x (first step, a change of non-sample shape, device or dtype), and at
    eps = 1 (no fixed basis is exact for an unseen input unless it is the whole mode), this is
    one HOSVD (:meth:`ProjectionState.refresh`). Otherwise the F fixed modes are projected,
    Y = X x_n U_n^T in ``state.order``, recording kept = ||Y||^2 / ||X||^2 on the device; then
    each of the first ``sample_modes`` modes is truncated at eps from its Gram matrix (top
    eigenvectors, the smallest rank explaining eps of the current tensor's energy), and
    ||S||^2 / ||X||^2 is recorded. kept below (eps - ``tolerance``)^F (read every step on the
    host, every ``check_every`` steps on an accelerator) refreshes the bases. Computed in float32
    (float64 for float64 input), returned in x's dtype; the fixed factors are the state's bases
    themselves (never modified in place: a refresh replaces them). NaN or Inf raise
    NonFiniteActivationError (on an accelerator when the sample modes' Gram matrix reaches the
    host, or at the next check).
    """
    eps = check_eps(eps)
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"projected_tucker needs a non-empty tensor, got shape {tuple(x.shape)}")
    sample_modes = min(sample_modes, x.ndim)
    state.steps += 1
    if eps >= 1.0 or not state.matches(x, sample_modes) or len(state.order) != x.ndim - sample_modes:
        return state.refresh(x, eps, sample_modes)
    host = _checks_every_step(x)
    xc = x.detach().to(compute_dtype(x))
    with threads_for(xc):
        if host:
            scale, total = 1.0, _energy(xc)
            if not _safe_energy(float(total), xc.dtype):
                xc, scale = finite_scaled(x)  # NaN/Inf raise here
                total = _energy(xc)
        else:
            xc, scale, amax = device_scaled(xc)
            total = _energy(xc)
        y, axes = xc, list(range(x.ndim))
        for mode in state.order:
            y, axes = Unfolding(y, axes, mode).project(state.bases[mode])
        tiny = torch.finfo(xc.dtype).tiny
        kept = torch.where(total > 0, _energy(y) / total.clamp_min(tiny), torch.ones_like(total))
    state.kept = kept
    floor = max(eps - tolerance, 0.0) ** len(state.order)
    if host:
        short = float(kept) < floor
    else:
        kept = torch.where(torch.isfinite(amax), kept, torch.full_like(kept, math.nan))
        state.worst = kept if state.worst is None else torch.minimum(state.worst, kept)
        state.since_check += 1
        short = False
        if state.since_check >= check_every:
            seen = float(state.worst)  # the one sync of a check
            state.since_check, state.worst = 0, None
            if not math.isfinite(seen):
                raise NonFiniteActivationError("the activation of a step since the last check held NaN or Inf values")
            short = seen < floor
    if short:
        state.shortfalls += 1
        return state.refresh(x, eps, sample_modes)
    factors: dict[int, Tensor] = dict(state.bases)
    for mode in [n for n in truncation_order(x.shape) if n < sample_modes]:
        with threads_for(y):
            unfolding = Unfolding(y, axes, mode)
            gram = unfolding.gram()
            copy = gram if gram.device.type == "cpu" else gram.cpu()  # the sample mode's rank needs it
            if not math.isfinite(float(copy.diagonal().sum())):
                raise NonFiniteActivationError("the activation holds NaN or Inf values")
            u = unfolding.factor(_leading_subspace(gram, eps, copy))
            y, axes = unfolding.project(u)
        factors[mode] = u
    state.explained = torch.where(total > 0, _energy(y) / total.clamp_min(tiny), torch.ones_like(total))
    core = unscaled(y.permute([axes.index(n) for n in range(x.ndim)]), scale)
    return Tucker(own(core, x.dtype), tuple(own(factors[n], x.dtype) for n in range(x.ndim)))
