"""Low-rank decompositions of activations: pure functions on tensors.

Every decomposition here works from Gram matrices: for a mode-n unfolding X_(n) (I_n x rest),
G_n = X_(n) X_(n)^T is symmetric positive semi-definite, its eigenvalues are the squared
singular values of X_(n) and its eigenvectors the left singular vectors. ``torch.linalg.eigh``
of an I_n x I_n Gram matrix gives the same subspace as a full SVD of the unfolding at a fraction
of the cost. Ranks are chosen by explained variance: keep the smallest k whose leading
eigenvalues sum to at least ``eps`` times the total, which is ||X||_F^2 for every mode.

All functions run under ``torch.no_grad()`` (decomposition work is never recorded by autograd),
compute in float32 (float64 for float64 inputs) whatever the input dtype, return contiguous
tensors in the input's dtype, and synchronise with the device once per call (twice for
``tracked_hosvd`` on a step that has to recompute a tracked mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import Tensor

from actcomp.factors import LowRank, Tucker, _mode_product

__all__ = [
    "NonFiniteActivationError",
    "SubspaceTracker",
    "tracked_hosvd",
    "check_eps",
    "explained_rank",
    "hosvd",
    "mode_gram",
    "truncated_svd",
]


class NonFiniteActivationError(FloatingPointError):
    """The tensor to decompose holds NaN or Inf: no subspace can be chosen from it."""


def check_eps(eps: object) -> float:
    """Return ``eps`` as a float if it is a real number in (0, 1], else raise ValueError."""
    if isinstance(eps, bool) or not isinstance(eps, Real) or not (0.0 < float(eps) <= 1.0):
        raise ValueError(
            f"eps must be a number in (0, 1] (the fraction of explained variance to keep), got {eps!r}"
        )
    return float(eps)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _own(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype``, contiguous and owning exactly its storage: a slice would keep the whole
    tensor it was cut from alive (a (n, 1) column slice even counts as contiguous)."""
    t = t.to(dtype).contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _rank_tensor(eigenvalues_desc: Tensor, eps: float) -> Tensor:
    """Smallest k with sum_{i<k} lambda_i >= eps * sum_i lambda_i, as a 0-d tensor (no sync)."""
    n = eigenvalues_desc.shape[-1]
    if eps >= 1.0:
        return torch.tensor(n, device=eigenvalues_desc.device)
    energy = eigenvalues_desc.clamp_min(0).cumsum(-1)
    k = (energy < eps * energy[..., -1:]).sum(-1) + 1
    return k.clamp_max(n)


def explained_rank(eigenvalues: Tensor, eps: float) -> int:
    """Smallest rank k whose k largest eigenvalues explain a fraction ``eps`` of their sum.

    With eigenvalues lambda_1 >= ... >= lambda_n >= 0 of a Gram matrix (the squared singular
    values of the unfolding), return the smallest k with
    ``sum_{i<=k} lambda_i >= eps * sum_i lambda_i``. Negative eigenvalues (round-off of a
    semi-definite matrix) count as zero; ``eps == 1`` keeps every eigenvalue, an all-zero
    spectrum keeps one. The eigenvalues may be given in any order.
    """
    eps = check_eps(eps)
    values = torch.as_tensor(eigenvalues).detach().reshape(-1)
    if values.numel() == 0:
        raise ValueError("explained_rank needs at least one eigenvalue")
    values = values.to(torch.float64).sort(descending=True).values
    return int(_rank_tensor(values, eps))


def mode_gram(x: Tensor, mode: int) -> Tensor:
    """Gram matrix ``X_(n) X_(n)^T`` of the mode-``mode`` unfolding of x, shape (I_n, I_n).

    Entry (i, j) is the inner product of the slices x[..., i, ...] and x[..., j, ...] taken
    along ``mode``. The first and last modes need no copy of x; a middle mode is made
    contiguous first, unless few slices lie before it, when a batched product is cheaper.
    """
    mode = mode % x.ndim
    size = x.shape[mode]
    before = math.prod(x.shape[:mode])
    after = math.prod(x.shape[mode + 1 :])
    v = x.reshape(before, size, after)
    if before == 1:
        m = v[0]
        return m @ m.T
    if after == 1:
        m = v[:, :, 0]
        return m.T @ m
    if before <= 64:
        if before * size * size * 8 <= x.numel():
            return torch.bmm(v, v.transpose(1, 2)).sum(0)
        gram = v[0] @ v[0].T
        for i in range(1, before):
            gram.addmm_(v[i], v[i].T)
        return gram
    m = v.transpose(0, 1).reshape(size, before * after)
    return m @ m.T


def _top_eigenvectors(grams: list[Tensor], eps: float) -> list[Tensor]:
    """Top eigenvectors of each Gram matrix by explained variance, with one host sync.

    On an accelerator the Gram matrices (small: I_n x I_n) travel to the host in one copy,
    the only sync, and are decomposed there: ``torch.linalg.eigh`` on CUDA synchronises once per
    call to check its result, and the ranks must reach the host anyway to size the factors.
    The chosen eigenvectors travel back in one non-blocking copy.

    Raises NonFiniteActivationError when the tensor behind the Gram matrices holds NaN/Inf
    (its squared norm, the trace of any of its Gram matrices, is then not finite).
    """
    if grams[0].device.type != "cpu":
        return _to_device(_top_eigenvectors(_to_host(grams, grams[0].dtype), eps), grams[0])
    if not bool(torch.isfinite(grams[0].diagonal().sum())):
        raise NonFiniteActivationError("the activation holds NaN or Inf values")
    out = []
    for g in grams:
        vectors, k = _eigen_desc(g, eps)
        out.append(vectors[:, :k])
    return out


def _eigen_desc(gram: Tensor, eps: float) -> tuple[Tensor, int]:
    """Eigenvectors of a host Gram matrix, largest eigenvalue first, and the eps rank."""
    values, vectors = torch.linalg.eigh(gram)
    return vectors.flip(-1), int(_rank_tensor(values.flip(-1), eps))


@torch.no_grad()
def hosvd(x: Tensor, eps: float) -> Tucker:
    """Truncated higher-order SVD of x with per-mode ranks from explained variance.

    For every mode n, the factor U_n holds the top-K_n eigenvectors of the Gram matrix
    G_n = X_(n) X_(n)^T, with K_n the smallest rank explaining a fraction ``eps`` of
    ||X||_F^2 (:func:`explained_rank`). The core is ``S = X x_0 U_0^T x_1 U_1^T ...``, so that
    ``X ~ S x_0 U_0 x_1 U_1 ...`` is the orthogonal projection of X onto the product of the
    mode subspaces; at ``eps == 1`` it is exact and K_n = min(I_n, rest_n), the most an
    unfolding's rank can be. When a mode is larger than the rest of the tensor
    (I_n > rest_n, e.g. the features of a Linear input with a small batch), the smaller Gram
    matrix X_(n)^T X_(n) is decomposed instead (same non-zero spectrum, V) and
    U_n = orth(X_(n) V): the transient workspace never exceeds the activation's size squared
    over its largest mode. Computed in float32 (float64 for float64 input), returned in x's
    dtype as contiguous tensors that share no storage with x.
    """
    eps = check_eps(eps)
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"hosvd needs a non-empty tensor, got shape {tuple(x.shape)}")
    xc = x.detach().to(_compute_dtype(x))
    vectors = _top_eigenvectors([_small_gram(xc, n) for n in range(xc.ndim)], eps)
    factors = [_mode_factor(xc, n, v) for n, v in enumerate(vectors)]
    core = xc
    # Project the modes that shrink the most first: every later product then works on less.
    for mode in sorted(range(xc.ndim), key=lambda n: factors[n].shape[1] / xc.shape[n]):
        core = _mode_product(core, factors[mode].T, mode)
    return Tucker(_own(core, x.dtype), tuple(_own(u, x.dtype) for u in factors))


def _unfold(x: Tensor, mode: int) -> Tensor:
    """The mode-``mode`` unfolding X_(n), shape (I_n, rest)."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def _is_wide(x: Tensor, mode: int) -> bool:
    """Mode larger than the rest of the tensor: its Gram matrix is the larger of the two."""
    return x.shape[mode] > x.numel() // x.shape[mode]


def _small_gram(x: Tensor, mode: int) -> Tensor:
    """The smaller Gram matrix of the mode-n unfolding: X_(n) X_(n)^T, or X_(n)^T X_(n) for a
    wide mode (same non-zero eigenvalues)."""
    if _is_wide(x, mode):
        m = _unfold(x, mode)
        return m.T @ m
    return mode_gram(x, mode)


def _mode_factor(x: Tensor, mode: int, vectors: Tensor) -> Tensor:
    """The mode-n factor from eigenvectors of :func:`_small_gram`: themselves, or for a wide
    mode orth(X_(n) V) (X_(n) V has orthogonal columns of norms sqrt(lambda)). QR keeps the
    span of every leading set of columns, so a factor's first k columns are the rank-k one."""
    if _is_wide(x, mode):
        return torch.linalg.qr(_unfold(x, mode) @ vectors.to(x.device, x.dtype)).Q
    return vectors


@torch.no_grad()
def truncated_svd(x: Tensor, eps: float) -> LowRank:
    """Rank-k truncated SVD of the mode-0 unfolding ``X_(0)`` (I_0 x rest) of x.

    k is the smallest rank explaining a fraction ``eps`` of ||X||_F^2. The eigen-decomposition
    is taken of the smaller of the two Gram matrices: with I_0 <= rest, U holds the top-k
    eigenvectors of X_(0) X_(0)^T and ``left = U``, ``right = U^T X_(0)``; otherwise V holds
    those of X_(0)^T X_(0) and ``left = X_(0) V``, ``right = V^T``. Either way
    ``left @ right = U_k S_k V_k^T``. ``right`` keeps x's trailing shape: (k, *x.shape[1:]).
    """
    eps = check_eps(eps)
    if x.ndim < 2 or x.numel() == 0:
        raise ValueError(f"truncated_svd needs a non-empty tensor of 2 or more dims, got {tuple(x.shape)}")
    m = x.detach().to(_compute_dtype(x)).reshape(x.shape[0], -1)
    if m.shape[0] <= m.shape[1]:
        (u,) = _top_eigenvectors([m @ m.T], eps)
        left, right = u, u.T @ m
    else:
        (v,) = _top_eigenvectors([m.T @ m], eps)
        left, right = m @ v, v.T
    k = left.shape[1]
    return LowRank(_own(left, x.dtype), _own(right.reshape(k, *x.shape[1:]), x.dtype))


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


def _to_host(tensors: list[Tensor], dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Copy tensors to the host in one transfer (the one sync), in ``dtype``."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _to_device(tensors: list[Tensor], like: Tensor) -> list[Tensor]:
    """Host tensors to ``like``'s device and dtype in one non-blocking copy from pinned memory
    (no sync); on the CPU only the dtype changes."""
    if like.device.type == "cpu" or not tensors:
        return [t.to(like.dtype) for t in tensors]
    packed = torch.cat([t.reshape(-1).to(like.dtype) for t in tensors]).pin_memory().to(like.device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(packed.split([t.numel() for t in tensors]), tensors)]


@torch.no_grad()
def tracked_hosvd(x: Tensor, eps: float, tracker: SubspaceTracker) -> Tucker:
    """Tucker factorisation with warm-started subspaces for the non-batch modes (ASI, adaptive).

    For each mode n >= 1 with a tracked factor U (I_n x r): T = X x_n U^T and
    Z = X_(n) T_(n)^T = G_n U (one subspace-iteration product, no I_n x I_n Gram matrix). The
    energy U explains, ||T||^2 = trace(U^T G_n U), is exact and free; if it is at least
    eps ||X||^2, U is this step's factor (the eps guarantee of :func:`hosvd` holds) and
    orth(Z), its columns ordered by their Rayleigh quotients and cut to the rank eps needs plus
    ``tracker.margin``, is carried to the next step (subspace iteration never loses energy on
    a fixed input, so a converged factor stays valid). If not, or on the first step, the mode
    is decomposed by Gram + eigh as in :func:`hosvd`. The batch mode is always Gram + eigh.
    All the numbers the host needs (norm, energies, the batch Gram matrix) travel in one copy:
    one sync per step, two on a step that recomputes a tracked mode.
    """
    eps = check_eps(eps)
    xc = x.detach().to(_compute_dtype(x))
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
    host = _to_host([xc.pow(2).sum().reshape(1), _small_gram(xc, 0), *[_small_gram(xc, n) for n in fresh], *energies])
    total, batch_gram = float(host[0]), host[1]
    if not math.isfinite(total):
        raise NonFiniteActivationError("the activation holds NaN or Inf values")
    fresh_grams = dict(zip(fresh, host[2 : 2 + len(fresh)]))
    tracked_energy = dict(zip(tracked, host[2 + len(fresh) :]))

    batch_vectors, batch_rank = _eigen_desc(batch_gram.to(xc.dtype), eps)
    factors: dict[int, Tensor] = {0: _mode_factor(xc, 0, *_to_device([batch_vectors[:, :batch_rank]], xc))}
    projected: dict[int, Tensor] = {}
    lost = []
    for n, (u, t, z) in tracked.items():
        energy = tracked_energy[n]
        if float(energy.sum()) < eps * total:
            lost.append(n)
            continue
        factors[n], projected[n] = u, t
        sorted_energy = torch.sort(energy, descending=True).values
        needed = int(_rank_tensor(sorted_energy, min(1.0, eps * total / float(energy.sum())) if total > 0 else 1.0))
        keep = min(xc.shape[n], needed + tracker.margin)
        order = torch.argsort(device_energy[n], descending=True)  # on the device: no transfer
        q = torch.linalg.qr(z[:, order]).Q
        tracker.factors[n] = _grow(q, keep)
    if lost:
        fresh_grams.update(zip(lost, _to_host([_small_gram(xc, n) for n in lost])))
    for n, gram in fresh_grams.items():
        tracker.recomputed += 1
        vectors, k = _eigen_desc(gram.to(xc.dtype), eps)
        carried = _mode_factor(xc, n, *_to_device([vectors[:, : k + tracker.margin]], xc))
        factors[n] = carried[:, :k]
        tracker.factors[n] = carried
    tracker.steps += 1

    start = min(projected, key=lambda n: factors[n].shape[1] / xc.shape[n]) if projected else None
    core = projected[start] if start is not None else xc
    for mode in sorted(range(n_modes), key=lambda n: factors[n].shape[1] / xc.shape[n]):
        if mode != start:
            core = _mode_product(core, factors[mode].T, mode)
    return Tucker(_own(core, x.dtype), tuple(_own(factors[n], x.dtype) for n in range(n_modes)))


def _grow(q: Tensor, rank: int) -> Tensor:
    """The first ``rank`` columns of the orthonormal q, completed with orthonormal directions
    (a fixed, seeded sketch, orthogonalised against q) when q has fewer columns."""
    if rank <= q.shape[1]:
        return q[:, :rank].contiguous()
    generator = torch.Generator(device="cpu").manual_seed(q.shape[0] * 7919 + rank)
    (extra,) = _to_device([torch.randn(q.shape[0], rank - q.shape[1], generator=generator, dtype=torch.float64)], q)
    extra -= q @ (q.T @ extra)
    return torch.linalg.qr(torch.cat([q, extra], dim=1)).Q
