"""Tucker factors of activations without host synchronisation in the steady state (GPU path).

:func:`actcomp.linalg.decompose.hosvd` needs every rank on the host before it can size a factor: one
host round trip per mode, and the eigen-decompositions run on the host. Here every mode keeps a
basis of fixed width (its *capacity*) from step to step, and one step is pure device work:

1. x is divided by the power of two nearest max|x| (exact, on the device: no overflow).
2. Modes are truncated in :func:`~actcomp.linalg.decompose.truncation_order`, as in ``hosvd``. For mode
   n with carried basis Q (I_n x r_n) and current tensor Y (X already projected on the earlier
   modes): ``iterations`` subspace-iteration steps Q <- orth((G / ||Y||^2 + delta) Q) on
   G = Y_(n) Y_(n)^T (formed when I_n <= 2 r_n x iterations, else applied as Y_(n) (Y_(n)^T Q)),
   orth by shifted CholeskyQR3 (three Cholesky factorisations of r x r matrices and triangular
   solves: no Householder QR, no eigen-decomposition, no data-dependent shape). delta = 1e-3
   keeps the iterated block full rank when Y's unfolding has fewer directions than r_n.
3. T = Y x_n Q^T; the energy of each direction, e_i = ||T_i||^2, is exact. On the device the
   rank k_n is the smallest number of directions, largest energy first, whose energies reach
   eps ||Y||^2; the other columns of the factor and slices of T are zeroed (an in-graph mask:
   the shapes stay r_n). The explained fraction, k_n and a shortfall flag (all r_n directions
   together below eps ||Y||^2) are recorded on the device.
4. The record (3 numbers per mode and max|x|) goes to the host in one non-blocking copy into
   pinned memory. At a later step, once that copy has completed (an event query: no wait), the
   host reads it: NaN/Inf raise NonFiniteActivationError then (one step late), a mode that fell
   short grows its capacity by half, one whose rank plus margin is below three quarters of its
   capacity shrinks. Changing a capacity changes shapes but needs no sync either.

The first step, and any step whose input shape, dtype or device changed, runs the exact
``hosvd`` (with its syncs) to initialise the bases and capacities.

Guarantee (observable, not enforced): at every step without a recorded shortfall, each mode
keeps at least eps of the energy of the tensor it truncates (the guarantee of ``hosvd``, so
||X - X~||^2 <= (1 - eps^N) ||X||^2). A step whose capacity fell short used every direction it
had; it is counted in ``SyncFreeState.shortfalls`` and its fractions are in the record, and the
capacity grows at the first step after the record reaches the host. The ranks are those of an
iterated, not exact, eigenbasis: k_n can exceed hosvd's. Factors are stored at capacity: the
masked columns are zeros that cost memory.
"""

from __future__ import annotations

import math
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from actcomp.linalg.decompose import hosvd, truncation_order
from actcomp.linalg.numerics import (
    NonFiniteActivationError,
    Unfolding,
    check_eps,
    cholesky_qr,
    compute_dtype,
    device_scaled,
    grow,
    one_thread,
    slice_gram,
    unscaled,
)
from actcomp.linalg.factors import Tucker

__all__ = ["SyncFreeState", "syncfree_hosvd", "syncfree_step"]

_DELTA = 1e-3  # shift of the normalised Gram matrix in subspace iteration: condition <= 1001


def _gram_times(unfolding: Unfolding, r: int, iterations: int):
    """(q -> G q, trace(G) or None) for G = Y_(n) Y_(n)^T: from the formed Gram matrix when that
    is cheaper than applying the unfolding twice per iteration (I <= 2 r x iterations), else
    as Y_(n) (Y_(n)^T q) (for a middle mode: a sum over the slices before it)."""
    size = unfolding.v.shape[1]
    if not unfolding.wide and size <= 2 * r * iterations:
        gram = slice_gram(unfolding.v) if unfolding.m is None else unfolding.m @ unfolding.m.T
        return (lambda q: gram @ q), gram.diagonal().sum()
    if unfolding.m is not None:
        m = unfolding.m
        return (lambda q: m @ (q.T.contiguous() @ m).T), None
    v = unfolding.v
    return (lambda q: torch.matmul(v, torch.matmul(q.T.contiguous(), v).transpose(1, 2)).sum(0)), None


@torch.no_grad()
def syncfree_step(
    x: Tensor, eps: float, bases: list[Tensor], iterations: list[int]
) -> tuple[Tucker, list[Tensor], Tensor]:
    """One sync-free Tucker factorisation of x from carried bases (steps 1-3 of the module doc).

    ``bases[n]`` is mode n's basis (I_n x r_n, orthonormal, on x's device, in x's compute
    dtype), ``iterations[n]`` its number of subspace-iteration steps. Returns the factors
    (masked to the ranks chosen on the device; shapes r_n), the bases to carry (the iterated
    ones, largest energy first) and the record: per mode the rank k_n, the explained fraction
    ||Y_j||^2 / ||Y_{j-1}||^2 and a shortfall flag (1.0 when all r_n directions explained less
    than eps, up to round-off), then max|x|, as one vector of 3 N + 1 numbers. Pure device work:
    it reads no value on the host (it runs on the meta device) and has no data-dependent shape.
    """
    xc, scale, amax = device_scaled(x.detach().to(compute_dtype(x)))
    n_modes = x.ndim
    y, axes = xc, list(range(n_modes))
    energy: Tensor | None = None
    factors: list[Tensor] = [xc] * n_modes
    carried: list[Tensor] = [xc] * n_modes
    record: list[list[Tensor]] = [[] for _ in range(n_modes)]
    tiny = torch.finfo(xc.dtype).tiny
    for mode in truncation_order(x.shape):
        q = bases[mode]
        r = q.shape[1]
        unfolding = Unfolding(y, axes, mode)
        apply, trace = _gram_times(unfolding, r, iterations[mode])
        if energy is None:
            energy = trace if trace is not None else xc.pow(2).sum()
        scale_g = 1.0 / energy.clamp_min(tiny)
        for _ in range(iterations[mode]):
            q = cholesky_qr(apply(q) * scale_g + _DELTA * q)
        y, axes = unfolding.project(q)
        at = axes.index(mode)
        direction_energy = y.pow(2) if y.ndim == 1 else y.pow(2).sum(dim=[d for d in range(y.ndim) if d != at])
        order = torch.argsort(direction_energy, descending=True)
        cumulative = direction_energy[order].cumsum(0)
        rank = ((cumulative < eps * energy).sum() + 1).clamp_max(r)
        chosen = (torch.arange(r, device=q.device) < rank).to(q.dtype)
        mask = torch.zeros_like(chosen).scatter(0, order, chosen)
        kept = (direction_energy * mask).sum()
        shape = [1] * y.ndim
        shape[at] = r
        y = y * mask.reshape(shape)
        factors[mode] = q * mask
        carried[mode] = q.index_select(1, order)
        unit = torch.finfo(q.dtype).eps
        short = cumulative[-1] < eps * energy * (1 - 64 * unit)
        fraction = torch.where(energy > 0, kept / energy.clamp_min(tiny), torch.ones_like(kept))
        record[mode] = [rank.to(q.dtype), fraction, short.to(q.dtype)]
        energy = kept
    core = unscaled(y.permute([axes.index(n) for n in range(n_modes)]), scale)
    # Every tensor here is a fresh product owning exactly its storage (what numerics.own
    # checks, which a compiled graph cannot).
    tucker = Tucker(core.to(x.dtype).contiguous(), tuple(u.to(x.dtype).contiguous() for u in factors))
    flat = [value for values in record for value in values] + [amax.to(xc.dtype)]
    return tucker, carried, torch.stack(flat)


@dataclass
class SyncFreeState:
    """Per-layer state of :func:`syncfree_hosvd`: carried bases, capacities and what the host
    has learnt from the device's records.

    ``margin``: spare capacity beyond the last rank, as a fraction of it (at least 1 column: a
    spare column costs memory in every mode's direction of the core).
    ``iterations``: subspace-iteration steps per mode and step; ``sample_iterations`` for the
    sample modes (the batch: its carried basis comes from an unrelated batch). ``bases[n]``: mode n's
    carried basis (its width is the capacity). ``steps``: factorisations; ``initialisations``:
    those that ran the exact ``hosvd`` (with host syncs); ``shortfalls``: mode-steps whose
    capacity explained less than eps (as far as the host has read the records);
    ``ranks``/``fractions``: the latest record read on the host (per mode: the rank the device
    chose and the fraction of energy it kept); ``records_read``: how many records reached it.
    """

    margin: float = 0.1
    iterations: int = 2
    sample_iterations: int = 3
    bases: list[Tensor] = field(default_factory=list)
    steps: int = 0
    initialisations: int = 0
    shortfalls: int = 0
    ranks: tuple[int, ...] = ()
    fractions: tuple[float, ...] = ()
    records_read: int = 0
    _pending: deque = field(default_factory=deque, repr=False, compare=False)
    _free: list = field(default_factory=list, repr=False, compare=False)
    _generator: torch.Generator | None = field(default=None, repr=False, compare=False)

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(int(q.shape[1]) for q in self.bases)

    def _matches(self, x: Tensor) -> bool:
        dtype = compute_dtype(x)
        return len(self.bases) == x.ndim and all(
            q.shape[0] == size and q.device == x.device and q.dtype == dtype for q, size in zip(self.bases, x.shape)
        )

    def _iteration_counts(self, n_modes: int, sample_modes: int = 1) -> list[int]:
        return [self.sample_iterations] * sample_modes + [self.iterations] * (n_modes - sample_modes)

    def _spare(self, rank: int) -> int:
        return max(1, math.ceil(self.margin * rank))

    def _limits(self, shape: torch.Size, capacities: list[int]) -> list[int]:
        """The most directions mode n can have: min(I_n, the other current sizes' product)."""
        current, limits = list(shape), [0] * len(shape)
        for mode in truncation_order(shape):
            limits[mode] = min(shape[mode], math.prod(current) // shape[mode])
            current[mode] = min(capacities[mode], limits[mode])
        return limits

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(0)
        return self._generator

    def _initialise(self, x: Tensor, eps: float) -> Tucker:
        """Exact hosvd (host syncs); bases = its factors plus spare directions."""
        tucker = hosvd(x, eps)
        dtype = compute_dtype(x)
        ranks = list(tucker.ranks)
        wanted = [k + self._spare(k) for k in ranks]
        limits = self._limits(x.shape, wanted)
        generator = self._generator_for(x.device)
        self.bases = [
            grow(u.to(dtype), min(want, limit), generator) for u, want, limit in zip(tucker.factors, wanted, limits)
        ]
        self._pending.clear()
        if x.device.type == "cuda":  # the steady state then reuses these: no allocation of pinned memory
            self._free = [
                (torch.empty(3 * x.ndim + 1, dtype=dtype, pin_memory=True), torch.cuda.Event()) for _ in range(3)
            ]
        self.initialisations += 1
        return tucker

    def _post(self, record: Tensor) -> None:
        """Start the record's way to the host: a non-blocking copy into pinned memory and an
        event on the device (buffers and events are reused once read); on the host it is there
        already."""
        if record.device.type != "cuda":
            self._pending.append((record.cpu(), None))
            return
        slot = next((i for i, (h, _) in enumerate(self._free) if h.shape == record.shape), None)
        if slot is None:  # only when the host lags more steps behind than ever before
            host, event = torch.empty(record.shape, dtype=record.dtype, pin_memory=True), torch.cuda.Event()
        else:
            host, event = self._free.pop(slot)
        host.copy_(record, non_blocking=True)
        event.record()
        self._pending.append((host, event))

    def collect(self) -> None:
        """Read every record that has reached the host (never waits), in order; adapt the
        capacities to the latest. Raises NonFiniteActivationError if a recorded step saw NaN/Inf."""
        latest = None
        while self._pending and (self._pending[0][1] is None or self._pending[0][1].query()):
            host, event = self._pending.popleft()
            values = host.tolist()
            if event is not None:
                self._free.append((host, event))
            self.records_read += 1
            if not math.isfinite(values[-1]):
                self._pending.clear()
                raise NonFiniteActivationError("the activation of a previous step held NaN or Inf values")
            modes = len(values) // 3
            self.shortfalls += sum(values[3 * n + 2] > 0 for n in range(modes))
            latest = values
        if latest is None or len(latest) // 3 != len(self.bases):
            return
        modes = len(self.bases)
        self.ranks = tuple(int(latest[3 * n]) for n in range(modes))
        self.fractions = tuple(latest[3 * n + 1] for n in range(modes))
        capacities = list(self.capacities)
        for n in range(modes):
            if latest[3 * n + 2] > 0:
                capacities[n] = max(capacities[n] + 2, math.ceil(capacities[n] * 1.5))
            elif self.ranks[n] + self._spare(self.ranks[n]) < 0.75 * capacities[n]:
                capacities[n] = self.ranks[n] + self._spare(self.ranks[n])
        shape = torch.Size(q.shape[0] for q in self.bases)
        limits = self._limits(shape, capacities)
        generator = self._generator_for(self.bases[0].device)
        self.bases = [
            q if min(c, limit) == q.shape[1] else grow(q, min(c, limit), generator)
            for q, c, limit in zip(self.bases, capacities, limits)
        ]

    def wait(self) -> None:
        """Block until every posted record has reached the host, then :meth:`collect` (a sync:
        for tests and for checking the guarantee at a chosen point, not for every step)."""
        for _, event in self._pending:
            if event is not None:
                event.synchronize()
        self.collect()

    def __deepcopy__(self, memo: dict) -> "SyncFreeState":
        """A copy that behaves as this state would from here on: bases, settings, counters and
        the records already on the host (a record still in flight is dropped: its CUDA event
        cannot be copied)."""
        pending = deque((host.clone(), None) for host, event in self._pending if event is None or event.query())
        return SyncFreeState(
            margin=self.margin, iterations=self.iterations, sample_iterations=self.sample_iterations,
            bases=[q.clone() for q in self.bases], steps=self.steps, initialisations=self.initialisations,
            shortfalls=self.shortfalls, ranks=self.ranks, fractions=self.fractions,
            records_read=self.records_read, _pending=pending,
        )

    def state_dict(self) -> dict:
        """Bases, settings and counters as tensors and numbers (records in flight are not kept)."""
        return {
            "margin": self.margin, "iterations": self.iterations, "sample_iterations": self.sample_iterations,
            "bases": list(self.bases), "steps": self.steps, "initialisations": self.initialisations,
            "shortfalls": self.shortfalls,
        }

    @classmethod
    def from_state_dict(cls, data: dict) -> "SyncFreeState":
        bases = data.get("bases", [])
        if not all(isinstance(q, Tensor) and q.ndim == 2 for q in bases):
            raise ValueError("syncfree state: 'bases' must be a list of matrices (one per mode)")
        return cls(
            margin=float(data.get("margin", 0.1)), iterations=int(data.get("iterations", 1)),
            sample_iterations=int(data.get("sample_iterations", 2)), bases=list(bases),
            steps=int(data.get("steps", 0)), initialisations=int(data.get("initialisations", 0)),
            shortfalls=int(data.get("shortfalls", 0)),
        )


@torch.no_grad()
def syncfree_hosvd(x: Tensor, eps: float, state: SyncFreeState, sample_modes: int = 1) -> Tucker:
    """Tucker factorisation of x with no host sync in the steady state (see the module doc).

    Reads the device records that have reached the host (:meth:`SyncFreeState.collect`: may
    raise NonFiniteActivationError for an earlier step, and grows or shrinks capacities), then
    either initialises ``state`` by the exact :func:`~actcomp.linalg.decompose.hosvd` (first step, or
    shape/dtype/device change: host syncs) or runs :func:`syncfree_step` and posts its record.
    On the host the step runs on one intra-op thread (its many small products would otherwise
    each wait for a second thread; there is no sync to avoid on the host anyway).
    The factors have the capacities' widths, their columns beyond each device-chosen rank zero,
    and ``reconstruct()`` is the orthogonal projection of x onto the chosen subspaces. The
    first ``sample_modes`` modes (batch; a Linear input's leading modes) take
    ``state.sample_iterations`` subspace-iteration steps, the others ``state.iterations``.
    """
    eps = check_eps(eps)
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"syncfree_hosvd needs a non-empty tensor, got shape {tuple(x.shape)}")
    state.steps += 1
    state.collect()
    if not state._matches(x):
        return state._initialise(x, eps)
    with one_thread() if x.device.type == "cpu" else nullcontext():
        counts = state._iteration_counts(x.ndim, min(sample_modes, x.ndim))
        tucker, state.bases, record = syncfree_step(x, eps, state.bases, counts)
    state._post(record)
    return tucker
