"""Warm-started subspace iteration for the Tucker factors of activations (method ``"asi"``).

The subspaces of the non-batch modes drift slowly from step to step; :func:`tracked_hosvd`
carries them in a :class:`SubspaceTracker` and refines them by one subspace-iteration product
per step (Z = G_n U without forming G_n), re-decomposing a mode by Gram + eigh only when the
carried subspace no longer explains eps of ||X||^2. One host sync per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from actcomp.linalg.factors import Tucker, _mode_product
from actcomp.linalg.numerics import (
    NonFiniteActivationError,
    check_eps,
    compute_dtype,
    device_scaled,
    eigen_desc,
    finite_scaled,
    grow,
    mode_factor,
    orth,
    own,
    rank_tensor,
    small_gram,
    to_device,
    to_host,
    unscaled,
)

__all__ = ["SubspaceTracker", "tracked_hosvd"]


@dataclass
class SubspaceTracker:
    """Per-layer state of warm-started subspace iteration (method ``"asi"``).

    ``factors[n]`` is the subspace carried to the next step for mode n >= 1 (the batch mode 0
    is never carried: batches are unrelated). ``margin`` extra directions are tracked beyond
    the rank eps needs, so that a slowly growing spectrum is caught before it breaks eps.
    ``recomputed`` counts the modes re-initialised by Gram + eigh (first step, shape, device or
    dtype change, or a step where the tracked subspace no longer explained eps).
    """

    margin: int = 2
    factors: dict[int, Tensor] = field(default_factory=dict)
    recomputed: int = 0
    steps: int = 0


@torch.no_grad()
def tracked_hosvd(x: Tensor, eps: float, tracker: SubspaceTracker) -> Tucker:
    """Tucker factorisation with warm-started subspaces for the non-batch modes (ASI, adaptive).

    For each mode n >= 1 with a tracked factor U (I_n x r): T = X x_n U^T and
    Z = X_(n) T_(n)^T = G_n U (one subspace-iteration product, no I_n x I_n Gram matrix). The
    energy U explains, ||T||^2 = trace(U^T G_n U), is exact and free; if it is at least
    eps ||X||^2, U is this step's factor (each factor explains eps of ||X||^2 on its own, the
    guarantee of a plain, not sequentially truncated, HOSVD) and
    orth(Z), its columns ordered by their Rayleigh quotients and cut to the rank eps needs plus
    ``tracker.margin``, is carried to the next step (subspace iteration never loses energy on
    a fixed input, so a converged factor stays valid). If not, or on the first step, the mode
    is decomposed by Gram + eigh as in :func:`hosvd`. The batch mode is always Gram + eigh.
    All the numbers the host needs (norm, energies, the batch Gram matrix, max|x| for the NaN/Inf
    check) travel in one copy: one sync per step, two on a step that recomputes a tracked mode.
    On an accelerator x is always divided by a power of two close to max|x| (exact; see
    :func:`finite_scaled`), on the host only when its squares would overflow.
    """
    eps = check_eps(eps)
    if x.device.type == "cpu":
        xc, scale = finite_scaled(x)
        checks: list[Tensor] = []
    else:  # scale on the device and check max|x| with the one copy to the host
        xc, scale, amax = device_scaled(x.detach().to(compute_dtype(x)))
        checks = [amax.reshape(1)]
    n_modes = xc.ndim
    others = lambda n: [m for m in range(n_modes) if m != n]  # noqa: E731
    tracked: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # mode -> (U, T, Z)
    for n in range(1, n_modes):
        u = tracker.factors.get(n)
        if u is None or u.shape[0] != xc.shape[n] or u.device != xc.device or u.dtype != xc.dtype:
            continue
        t = _mode_product(xc, u.T, n)
        z = torch.tensordot(xc, t, dims=(others(n), others(n)))
        tracked[n] = (u, t, z)
    fresh = [n for n in range(1, n_modes) if n not in tracked]
    device_energy = {n: tracked[n][1].pow(2).sum(dim=others(n)) for n in tracked}  # per tracked direction
    energies = list(device_energy.values())
    host = to_host([*checks, xc.pow(2).sum().reshape(1), small_gram(xc, 0), *[small_gram(xc, n) for n in fresh], *energies])
    if checks and not math.isfinite(float(host.pop(0))):
        raise NonFiniteActivationError("the activation holds NaN or Inf values")
    total, batch_gram = float(host[0]), host[1]
    fresh_grams = dict(zip(fresh, host[2 : 2 + len(fresh)]))
    tracked_energy = dict(zip(tracked, host[2 + len(fresh) :]))

    batch_vectors, batch_rank = eigen_desc(batch_gram.to(xc.dtype), eps)
    factors: dict[int, Tensor] = {0: mode_factor(xc, 0, *to_device([batch_vectors[:, :batch_rank]], xc))}
    projected: dict[int, Tensor] = {}
    lost = []
    for n, (u, t, z) in tracked.items():
        energy = tracked_energy[n]
        if float(energy.sum()) < eps * total:
            lost.append(n)
            continue
        factors[n], projected[n] = u, t
        sorted_energy = torch.sort(energy, descending=True).values
        needed = int(rank_tensor(sorted_energy, min(1.0, eps * total / float(energy.sum())) if total > 0 else 1.0))
        keep = min(xc.shape[n], needed + tracker.margin)
        order = torch.argsort(device_energy[n], descending=True)  # on the device: no transfer
        tracker.factors[n] = grow(orth(z[:, order]), keep)
    if lost:
        fresh_grams.update(zip(lost, to_host([small_gram(xc, n) for n in lost])))
    for n, gram in fresh_grams.items():
        tracker.recomputed += 1
        vectors, k = eigen_desc(gram.to(xc.dtype), eps)
        carried = mode_factor(xc, n, *to_device([vectors[:, : k + tracker.margin]], xc))
        factors[n] = carried[:, :k]
        tracker.factors[n] = carried
    tracker.steps += 1

    start = min(projected, key=lambda n: factors[n].shape[1] / xc.shape[n]) if projected else None
    core = projected[start] if start is not None else xc
    for mode in sorted(range(n_modes), key=lambda n: factors[n].shape[1] / xc.shape[n]):
        if mode != start:
            core = _mode_product(core, factors[mode].T, mode)
    return Tucker(own(unscaled(core, scale), x.dtype), tuple(own(factors[n], x.dtype) for n in range(n_modes)))
