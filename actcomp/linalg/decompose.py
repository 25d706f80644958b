"""Low-rank decompositions of activations: pure functions on tensors.

Every decomposition here works from Gram matrices: for a mode-n unfolding X_(n) (I_n x rest),
G_n = X_(n) X_(n)^T is symmetric positive semi-definite, its eigenvalues are the squared
singular values of X_(n) and its eigenvectors the left singular vectors. ``torch.linalg.eigh``
of an I_n x I_n Gram matrix gives the same subspace as a full SVD of the unfolding at a fraction
of the cost. Ranks are chosen by explained variance: keep the smallest k whose leading
eigenvalues sum to at least ``eps`` times the total, the squared norm of the tensor the Gram
matrix was formed from. :func:`hosvd` truncates the modes one after another (each Gram matrix
formed from the tensor already projected on the earlier modes); :func:`tracked_hosvd` and
:func:`truncated_svd` form theirs from x itself.

All functions run under ``torch.no_grad()`` (decomposition work is never recorded by autograd),
compute in float32 (float64 for float64 inputs) whatever the input dtype, return contiguous
tensors in the input's dtype, decompose finite inputs whose squares overflow by scaling them by
a power of two (exact), raise NonFiniteActivationError on NaN/Inf, and run the host's LAPACK
calls on one thread. On an accelerator they synchronise with the host once per mode for
``hosvd``, once per call for ``truncated_svd`` and once per step for ``tracked_hosvd`` (twice
on a step that recomputes a tracked mode); :mod:`actcomp.linalg.syncfree` never does in its steady state.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from actcomp.linalg.factors import LowRank, Tucker
from actcomp.linalg.numerics import (
    NonFiniteActivationError,
    Unfolding,
    check_eps,
    compute_dtype,
    finite_scaled,
    mode_gram,
    one_thread,
    own,
    rank_tensor,
    threads_for,
    to_device,
    unscaled,
)
from actcomp.linalg.tracked import SubspaceTracker, tracked_hosvd

__all__ = [
    "NonFiniteActivationError",
    "SubspaceTracker",
    "tracked_hosvd",
    "check_eps",
    "explained_rank",
    "hosvd",
    "mode_gram",
    "truncated_svd",
    "truncation_order",
]


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
    return int(rank_tensor(values, eps))


_EXACT_EIGH_MAX = 256  # Gram matrices up to this size are decomposed exactly (see _leading_subspace)
_POWER_STEPS = 2  # subspace-iteration steps per block of the randomized solver


def truncation_order(shape: tuple[int, ...] | torch.Size) -> list[int]:
    """The order in which :func:`hosvd` truncates the modes of a tensor of ``shape``: smallest
    mode first (its Gram matrix is the cheapest to form and decompose, and truncating it shrinks
    the tensor every later Gram matrix is formed from), ties broken towards the last mode."""
    return sorted(range(len(shape)), key=lambda n: (shape[n], -n))


def _leading_subspace(gram: Tensor, eps: float, host: Tensor | None = None) -> Tensor:
    """Orthonormal V (n x k) with trace(V^T G V) >= eps trace(G), k as small as found.

    Up to ``_EXACT_EIGH_MAX`` rows (and at eps = 1): the top-k eigenvectors of G, k the smallest
    rank explaining eps (exact). Larger: a dense eigen-decomposition costs a tridiagonal
    reduction (memory-bound, 25 ms for 500 x 500 on one core), so blocks of a fixed pseudo-random
    start (seeded by n: deterministic, the global RNG untouched) are taken through
    ``_POWER_STEPS`` + 1 products with G, deflated and orthonormalised, until the basis Q holds
    eps of trace(G) (exact: trace(Q^T G Q)); then the Rayleigh-Ritz vectors Q S of Q^T G Q,
    largest first, are cut at the smallest k whose Ritz values (the exact energies of those
    orthonormal vectors) sum to eps trace(G). The guarantee is the same as the exact one's; k can
    exceed the optimal rank by the subspace's inaccuracy (3% on the benchmark's 500 x 500 Gram
    matrix). Works on the host (``host``: G's host copy, if already made), one thread; the
    result goes to G's device in a non-blocking copy.
    """
    if host is None:
        host = gram if gram.device.type == "cpu" else gram.cpu()
    n = host.shape[0]
    with one_thread():
        if n <= _EXACT_EIGH_MAX or eps >= 1.0:
            values, vectors = torch.linalg.eigh(host)
            k = int(rank_tensor(values.flip(-1), eps))
            (vectors,) = to_device([vectors.flip(-1)[:, :k].contiguous()], gram)
            return vectors
        target = eps * float(host.diagonal().clamp_min(0).sum())
        generator = torch.Generator().manual_seed(n)
        block = max(16, n // 16)
        basis, image = host.new_empty(n, 0), host.new_empty(n, 0)  # Q and G Q
        captured = 0.0
        while basis.shape[1] == 0 or (captured < target and basis.shape[1] < n):  # one block at least
            w = torch.randn(n, min(block, n - basis.shape[1]), generator=generator, dtype=host.dtype)
            for _ in range(_POWER_STEPS + 1):
                w = host @ w
                for _ in range(2):  # deflate twice: one pass loses orthogonality to round-off
                    w = w - basis @ (basis.T @ w)
                w = torch.linalg.qr(w).Q
            gw = host @ w
            basis, image = torch.cat([basis, w], 1), torch.cat([image, gw], 1)
            captured += float((w * gw).sum())
        ritz = basis.T @ image
        values, vectors = torch.linalg.eigh((ritz + ritz.T) / 2)
        energy = values.flip(-1).clamp_min(0).cumsum(0)
        k = min(int((energy < target).sum()) + 1, basis.shape[1])
        (vectors,) = to_device([basis @ vectors.flip(-1)[:, :k].contiguous()], gram)
        return vectors


def _safe_energy(energy: float, dtype: torch.dtype) -> bool:
    """||X||^2 finite and far enough from overflow and underflow for every sum of squares."""
    info = torch.finfo(dtype)
    return math.isfinite(energy) and info.tiny * 2.0**24 < energy < info.max / 64


def _first_gram(x: Tensor, gram_of: Callable[[Tensor], Tensor]) -> tuple[Tensor, float, Tensor, Tensor]:
    """(xc, scale, G, G's host copy) with G = gram_of(xc), xc = x in its compute dtype.

    The trace of any Gram matrix of x is ||X||^2: NaN, Inf and overflowing sums of squares
    show there at no extra pass over x, and the host copy (the one sync on an accelerator) is
    needed anyway for the eigen-decomposition. If the trace is not safely inside the dtype's
    range, x is checked and scaled by :func:`finite_scaled` (raising NonFiniteActivationError
    on NaN/Inf) and G formed again.
    """
    xc = x.detach().to(compute_dtype(x))
    gram = gram_of(xc)
    host = gram if gram.device.type == "cpu" else gram.cpu()
    if _safe_energy(float(host.diagonal().sum()), xc.dtype):
        return xc, 1.0, gram, host
    xc, scale = finite_scaled(x)
    gram = gram_of(xc)
    return xc, scale, gram, gram if gram.device.type == "cpu" else gram.cpu()


def mode_thresholds(eps: float | Sequence[float], modes: int) -> tuple[float, ...]:
    """One explained-variance threshold per mode: ``eps`` repeated, or ``eps`` itself when it
    is a sequence of ``modes`` thresholds; each checked to lie in (0, 1]."""
    if isinstance(eps, Sequence) and not isinstance(eps, str):
        if len(eps) != modes:
            raise ValueError(f"eps per mode needs {modes} thresholds for a tensor of {modes} modes, got {len(eps)}")
        return tuple(check_eps(e) for e in eps)
    return (check_eps(eps),) * modes


@torch.no_grad()
def hosvd(x: Tensor, eps: float | Sequence[float], order: Sequence[int] | None = None) -> Tucker:
    """Sequentially truncated higher-order SVD of x, each mode's rank from explained variance.

    The modes are truncated one after another in :func:`truncation_order` (smallest first).
    With Y_0 = X and Y_j the tensor after j truncations, the j-th mode n gets a factor U_n whose
    K_n orthonormal columns span the leading subspace of the Gram matrix of Y_{j-1}'s mode-n
    unfolding, K_n the smallest rank explaining a fraction ``eps`` of ||Y_{j-1}||^2 (the top-K_n
    eigenvectors, :func:`explained_rank`), and Y_j = Y_{j-1} x_n U_n^T. The core is the last Y.
    So, exactly (up to float round-off):

    * every step keeps ||Y_j||^2 >= eps ||Y_{j-1}||^2: each factor explains a fraction eps of
      the energy of the tensor it was computed from, X already projected on the earlier modes;
    * ``X ~ S x_0 U_0 x_1 U_1 ...`` is the orthogonal projection of X onto the product of the
      mode subspaces, so ||X - X~||^2 = ||X||^2 - ||S||^2 <= (1 - eps^N) ||X||^2 for N modes;
    * at ``eps == 1`` it is exact, with K_n = min(I_n, product of the other current sizes).

    ``eps`` may also be one threshold per mode (``eps[n]`` for mode n, e.g. ``(1.0, 0.9, 0.9,
    0.9)`` keeps the batch mode of a (B, C, H, W) input whole and truncates the others): every
    statement above holds with eps_n in place of eps, and ||X - X~||^2 <= (1 - prod_n eps_n)
    ||X||^2.

    A plain HOSVD decomposes every unfolding of X itself, so that each factor alone explains eps
    of ||X||^2; truncating sequentially forms the large Gram matrices from an already shrunk
    tensor. Gram matrices larger than 256 x 256 are decomposed by randomized subspace iteration
    (:func:`_leading_subspace`): the same guarantee, K_n possibly a few percent above the
    optimal rank. When a mode is larger than the rest of the current tensor, the smaller Gram
    matrix X_(n)^T X_(n) is decomposed instead and U_n = orth(X_(n) V). Computed in float32
    (float64 for float64 input); when squares of x would overflow or underflow, x is divided by
    a power of two first (exact, :func:`finite_scaled`); NaN or Inf raise
    NonFiniteActivationError. Returned in x's dtype as contiguous tensors that share no storage
    with x. Deterministic; on an accelerator one host sync per mode (its rank). ``order`` (a
    permutation of the modes) replaces :func:`truncation_order` (method ``oneshot`` truncates
    its fixed modes first, in the order its steps project them).
    """
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"hosvd needs a non-empty tensor, got shape {tuple(x.shape)}")
    mode_eps = mode_thresholds(eps, x.ndim)
    order = truncation_order(x.shape) if order is None else list(order)
    if sorted(order) != list(range(x.ndim)):
        raise ValueError(f"hosvd's order must be a permutation of the {x.ndim} modes, got {order}")
    axes = list(range(x.ndim))
    first: list[Unfolding] = []

    def first_gram(t: Tensor) -> Tensor:
        first[:] = [Unfolding(t, axes, order[0])]
        return first[0].gram()

    with threads_for(x):
        xc, scale, gram, host = _first_gram(x, first_gram)
    y = xc
    factors: list[Tensor] = [xc] * x.ndim
    for step, mode in enumerate(order):
        with threads_for(y):
            unfolding = first[0] if step == 0 else Unfolding(y, axes, mode)
            if step > 0:
                gram, host = unfolding.gram(), None
            u = unfolding.factor(_leading_subspace(gram, mode_eps[mode], host))
            y, axes = unfolding.project(u)
        factors[mode] = u
    core = unscaled(y.permute([axes.index(n) for n in range(x.ndim)]), scale)
    return Tucker(own(core, x.dtype), tuple(own(u, x.dtype) for u in factors))


def _svd_gram(m: Tensor, wide: bool) -> Tensor:
    return m.T @ m if wide else m @ m.T


@torch.no_grad()
def truncated_svd(x: Tensor, eps: float) -> LowRank:
    """Rank-k truncated SVD of the mode-0 unfolding ``X_(0)`` (I_0 x rest) of x.

    k is the smallest rank explaining a fraction ``eps`` of ||X||_F^2. The eigen-decomposition
    is taken of the smaller of the two Gram matrices: with I_0 <= rest, U holds the top-k
    eigenvectors of X_(0) X_(0)^T and ``left = U``, ``right = U^T X_(0)``; otherwise V holds
    those of X_(0)^T X_(0) and ``left = X_(0) V``, ``right = V^T``. Either way
    ``left @ right = U_k S_k V_k^T``. ``right`` keeps x's trailing shape: (k, *x.shape[1:]).
    A Gram matrix larger than 256 x 256 is decomposed as in :func:`hosvd` (randomized: the
    same guarantee, k possibly a few percent above the optimal rank). Finite inputs whose
    squares would overflow are scaled as in :func:`hosvd`; NaN or Inf raise
    NonFiniteActivationError. One host sync on an accelerator.
    """
    eps = check_eps(eps)
    if x.ndim < 2 or x.numel() == 0:
        raise ValueError(f"truncated_svd needs a non-empty tensor of 2 or more dims, got {tuple(x.shape)}")
    wide = x.shape[0] > x.numel() // x.shape[0]
    xc, scale, gram, host = _first_gram(x, lambda t: _svd_gram(t.reshape(x.shape[0], -1), wide))
    m = xc.reshape(x.shape[0], -1)
    vectors = _leading_subspace(gram, eps, host)
    if not wide:
        left, right = vectors, unscaled(vectors.T @ m, scale)
    else:
        left, right = unscaled(m @ vectors, scale), vectors.T
    k = left.shape[1]
    return LowRank(own(left, x.dtype), own(right.reshape(k, *x.shape[1:]), x.dtype))


