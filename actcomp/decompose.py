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
on a step that recomputes a tracked mode); :mod:`actcomp.syncfree` never does in its steady state.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable, Iterator

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
    "truncation_order",
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


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the enclosed host work on one intra-op thread, then restore the setting.

    Used for the eigen-decompositions and QR factorisations (small matrices: a tridiagonal
    reduction synchronises its threads at every column) and for products on small tensors
    (:func:`_threads_for`). On a machine whose cores are busy with other work each of those
    synchronisations can wait a whole scheduler tick (measured on a shared 2-core host: eigh of
    a 128 x 128 matrix 0.7 ms on one thread, 540 ms on two). The setting is process-wide for the
    duration of the block.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _orth(m: Tensor) -> Tensor:
    """Orthonormal basis Q of the columns of m (Householder QR, one thread on the host): QR keeps
    the span of every leading set of columns, so Q's first k columns span m's first k."""
    if m.device.type != "cpu":
        return torch.linalg.qr(m).Q
    with _one_thread():
        return torch.linalg.qr(m).Q


def _finite_scaled(x: Tensor) -> tuple[Tensor, float]:
    """x detached in its compute dtype, divided by an exact power of two ``scale`` when its
    squares would overflow or underflow that dtype; returns (scaled x, scale).

    Every decomposition here sums squares of x (Gram matrices, ||X||^2): with float32 entries
    near 1e18 those sums overflow although x is finite. max|x| (one reduction, read on the host:
    a sync on accelerators) tells whether x is finite at all (NaN/Inf raise
    NonFiniteActivationError) and whether numel * max|x|^2 stays well inside the dtype's range;
    if not, x is divided by 2^e with max|x| = m 2^e, m in [0.5, 1). Dividing by a power of two
    is exact (barring results below the smallest normal number, which are negligible against
    max|x| in every sum), factors and ranks do not depend on the scale, and the core is
    multiplied back by it, so a scaled decomposition equals the unscaled one wherever the latter
    is representable.
    """
    xc = x.detach().to(_compute_dtype(x))
    low, high = torch.aminmax(xc)
    amax = max(-float(low), float(high))
    if not math.isfinite(amax):
        raise NonFiniteActivationError("the activation holds NaN or Inf values")
    info = torch.finfo(xc.dtype)
    if amax == 0.0 or (amax * amax * xc.numel() < info.max / 64 and amax * amax > info.tiny * 2.0**24):
        return xc, 1.0
    scale = math.ldexp(1.0, math.frexp(amax)[1])
    return xc / scale, scale


def _unscaled(core: Tensor, scale: float | Tensor) -> Tensor:
    """The core of a decomposition of x / scale turned into the core of x."""
    return core if isinstance(scale, float) and scale == 1.0 else core * scale


def _power_of_two(exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """2^exponent in ``dtype`` (float32 or float64), built from its bits: exact, on the device."""
    if dtype == torch.float64:
        return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def _device_scaled(xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(xc / 2^e, 2^e, max|xc|) with max|xc| = m 2^e, m in [0.5, 1), all on xc's device and
    without a host read. Exact as in :func:`_finite_scaled`, but always applied (deciding would
    need the host). NaN or Inf leave xc unscaled and show in max|xc|, which the caller checks."""
    low, high = torch.aminmax(xc)
    amax = torch.maximum(-low, high)
    limit = 1022 if xc.dtype == torch.float64 else 126  # 2^±limit is a normal number
    exponent = torch.frexp(amax).exponent
    exponent = torch.where(torch.isfinite(amax) & (amax > 0), exponent, 0).clamp(-limit, limit)
    scale = _power_of_two(exponent, xc.dtype)
    return xc / scale, scale, amax


_FEW_SLICES = 64  # a middle mode with at most this many slices before it is handled in place
_EXACT_EIGH_MAX = 256  # Gram matrices up to this size are decomposed exactly (see _leading_subspace)
_POWER_STEPS = 2  # subspace-iteration steps per block of the randomized solver


def truncation_order(shape: tuple[int, ...] | torch.Size) -> list[int]:
    """The order in which :func:`hosvd` truncates the modes of a tensor of ``shape``: smallest
    mode first (its Gram matrix is the cheapest to form and decompose, and truncating it shrinks
    the tensor every later Gram matrix is formed from), ties broken towards the last mode."""
    return sorted(range(len(shape)), key=lambda n: (shape[n], -n))


class _Unfolding:
    """The mode-n unfolding X_(n) (I x rest) of a contiguous tensor y whose dimensions hold the
    original modes ``axes`` in that order, reached without copying y where possible.

    Seen as (before, I, after) around the mode, the unfolding is a plain matrix when the mode is
    first or last (``m``, possibly a transposed view), and its Gram matrix a sum over ``before``
    slices when the mode is in the middle with few slices before it; only otherwise is y copied
    to bring the mode first. ``wide``: I > rest, the Gram matrix X_(n)^T X_(n) is the smaller.
    """

    def __init__(self, y: Tensor, axes: list[int], mode: int) -> None:
        p = axes.index(mode)
        if 0 < p < y.ndim - 1 and (math.prod(y.shape[:p]) > _FEW_SLICES or y.shape[p] ** 2 > y.numel()):
            y, axes, p = y.movedim(p, 0).contiguous(), [mode] + axes[:p] + axes[p + 1 :], 0
        self.y, self.axes, self.p, self.mode = y, axes, p, mode
        before, size, after = math.prod(y.shape[:p]), y.shape[p], math.prod(y.shape[p + 1 :])
        self.v = y.reshape(before, size, after)
        self.m = self.v[0] if before == 1 else self.v[:, :, 0].T if after == 1 else None
        self.wide = self.m is not None and size > self.m.shape[1]

    def gram(self) -> Tensor:
        """The smaller Gram matrix: X_(n) X_(n)^T, or X_(n)^T X_(n) when wide."""
        if self.m is None:
            return _slice_gram(self.v)
        return self.m.T @ self.m if self.wide else self.m @ self.m.T

    def factor(self, vectors: Tensor) -> Tensor:
        """U_n from orthonormal vectors of :meth:`gram`'s leading subspace: themselves, or
        orth(X_(n) V) when wide (X_(n) V spans the same subspace of the mode as V of the rest)."""
        return _orth(self.m @ vectors) if self.wide else vectors

    def project(self, u: Tensor) -> tuple[Tensor, list[int]]:
        """y x_n U^T and its axes. A last mode comes out first (U^T X_(n) is laid out that
        way), which puts the mode before it last for the next step."""
        ut, shape, p = u.T.contiguous(), self.y.shape, self.p
        k = u.shape[1]
        if self.m is None:
            return torch.matmul(ut, self.v).reshape(*shape[:p], k, *shape[p + 1 :]), self.axes
        if self.v.shape[0] == 1:
            return (ut @ self.m).reshape(*shape[:p], k, *shape[p + 1 :]), self.axes
        return (ut @ self.m).reshape(k, *shape[:-1]), [self.mode] + self.axes[:-1]


def _slice_gram(v: Tensor) -> Tensor:
    """sum_i v[i] v[i]^T for v of shape (before, I, after): a middle mode's Gram matrix in place."""
    before, size, after = v.shape
    if before * size * size <= v.numel():
        return torch.bmm(v, v.transpose(1, 2)).sum(0)
    gram = v[0] @ v[0].T
    for i in range(1, before):
        gram.addmm_(v[i], v[i].T)
    return gram


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
    with _one_thread():
        if n <= _EXACT_EIGH_MAX or eps >= 1.0:
            values, vectors = torch.linalg.eigh(host)
            k = int(_rank_tensor(values.flip(-1), eps))
            (vectors,) = _to_device([vectors.flip(-1)[:, :k].contiguous()], gram)
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
        (vectors,) = _to_device([basis @ vectors.flip(-1)[:, :k].contiguous()], gram)
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
    range, x is checked and scaled by :func:`_finite_scaled` (raising NonFiniteActivationError
    on NaN/Inf) and G formed again.
    """
    xc = x.detach().to(_compute_dtype(x))
    gram = gram_of(xc)
    host = gram if gram.device.type == "cpu" else gram.cpu()
    if _safe_energy(float(host.diagonal().sum()), xc.dtype):
        return xc, 1.0, gram, host
    xc, scale = _finite_scaled(x)
    gram = gram_of(xc)
    return xc, scale, gram, gram if gram.device.type == "cpu" else gram.cpu()


@torch.no_grad()
def hosvd(x: Tensor, eps: float) -> Tucker:
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

    A plain HOSVD decomposes every unfolding of X itself, so that each factor alone explains eps
    of ||X||^2; truncating sequentially forms the large Gram matrices from an already shrunk
    tensor. Gram matrices larger than 256 x 256 are decomposed by randomized subspace iteration
    (:func:`_leading_subspace`): the same guarantee, K_n possibly a few percent above the
    optimal rank. When a mode is larger than the rest of the current tensor, the smaller Gram
    matrix X_(n)^T X_(n) is decomposed instead and U_n = orth(X_(n) V). Computed in float32
    (float64 for float64 input); when squares of x would overflow or underflow, x is divided by
    a power of two first (exact, :func:`_finite_scaled`); NaN or Inf raise
    NonFiniteActivationError. Returned in x's dtype as contiguous tensors that share no storage
    with x. Deterministic; on an accelerator one host sync per mode (its rank).
    """
    eps = check_eps(eps)
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"hosvd needs a non-empty tensor, got shape {tuple(x.shape)}")
    order = truncation_order(x.shape)
    axes = list(range(x.ndim))
    first: list[_Unfolding] = []

    def first_gram(t: Tensor) -> Tensor:
        first[:] = [_Unfolding(t, axes, order[0])]
        return first[0].gram()

    with _threads_for(x):
        xc, scale, gram, host = _first_gram(x, first_gram)
    y = xc
    factors: list[Tensor] = [xc] * x.ndim
    for step, mode in enumerate(order):
        with _threads_for(y):
            unfolding = first[0] if step == 0 else _Unfolding(y, axes, mode)
            if step > 0:
                gram, host = unfolding.gram(), None
            u = unfolding.factor(_leading_subspace(gram, eps, host))
            y, axes = unfolding.project(u)
        factors[mode] = u
    core = _unscaled(y.permute([axes.index(n) for n in range(x.ndim)]), scale)
    return Tucker(_own(core, x.dtype), tuple(_own(u, x.dtype) for u in factors))


_PARALLEL_MIN_NUMEL = 1 << 22  # host tensors smaller than this are worked on by one thread


def _threads_for(y: Tensor):
    """One intra-op thread for the products on a host tensor of fewer than 2^22 elements, the
    default otherwise. A truncation step reads its tensor about twice (Gram matrix, projection):
    at ~5 GB/s per core, 4M float32 elements take ~3 ms, about one scheduler tick. Each parallel
    product waits for all its threads at its end, and on a host whose cores are busy with other
    work that wait can take a tick, more than a second thread saves below that size (measured
    on the shared 2-core host: a 7 x 7 triu took 8.7 ms on two threads; whole-layer steps were
    up to 1.4x faster with the decomposition on one thread under load)."""
    return _one_thread() if y.device.type == "cpu" and y.numel() < _PARALLEL_MIN_NUMEL else nullcontext()


def _eigen_desc(gram: Tensor, eps: float) -> tuple[Tensor, int]:
    """Eigenvectors of a host Gram matrix, largest eigenvalue first, and the eps rank."""
    with _one_thread():
        values, vectors = torch.linalg.eigh(gram)
    return vectors.flip(-1), int(_rank_tensor(values.flip(-1), eps))


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
        return _orth(_unfold(x, mode) @ vectors.to(x.device, x.dtype))
    return vectors


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
        left, right = vectors, _unscaled(vectors.T @ m, scale)
    else:
        left, right = _unscaled(m @ vectors, scale), vectors.T
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
    eps ||X||^2, U is this step's factor (each factor explains eps of ||X||^2 on its own, the
    guarantee of a plain, not sequentially truncated, HOSVD) and
    orth(Z), its columns ordered by their Rayleigh quotients and cut to the rank eps needs plus
    ``tracker.margin``, is carried to the next step (subspace iteration never loses energy on
    a fixed input, so a converged factor stays valid). If not, or on the first step, the mode
    is decomposed by Gram + eigh as in :func:`hosvd`. The batch mode is always Gram + eigh.
    All the numbers the host needs (norm, energies, the batch Gram matrix, max|x| for the NaN/Inf
    check) travel in one copy: one sync per step, two on a step that recomputes a tracked mode.
    On an accelerator x is always divided by a power of two close to max|x| (exact; see
    :func:`_finite_scaled`), on the host only when its squares would overflow.
    """
    eps = check_eps(eps)
    if x.device.type == "cpu":
        xc, scale = _finite_scaled(x)
        checks: list[Tensor] = []
    else:  # scale on the device and check max|x| with the one copy to the host
        xc, scale, amax = _device_scaled(x.detach().to(_compute_dtype(x)))
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
    host = _to_host([*checks, xc.pow(2).sum().reshape(1), _small_gram(xc, 0), *[_small_gram(xc, n) for n in fresh], *energies])
    if checks and not math.isfinite(float(host.pop(0))):
        raise NonFiniteActivationError("the activation holds NaN or Inf values")
    total, batch_gram = float(host[0]), host[1]
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
        tracker.factors[n] = _grow(_orth(z[:, order]), keep)
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
    return Tucker(_own(_unscaled(core, scale), x.dtype), tuple(_own(factors[n], x.dtype) for n in range(n_modes)))


def _grow(q: Tensor, rank: int) -> Tensor:
    """The first ``rank`` columns of the orthonormal q, completed with orthonormal directions
    (a fixed, seeded sketch, orthogonalised against q) when q has fewer columns."""
    if rank <= q.shape[1]:
        return q[:, :rank].contiguous()
    generator = torch.Generator(device="cpu").manual_seed(q.shape[0] * 7919 + rank)
    (extra,) = _to_device([torch.randn(q.shape[0], rank - q.shape[1], generator=generator, dtype=torch.float64)], q)
    extra -= q @ (q.T @ extra)
    return torch.linalg.qr(torch.cat([q, extra], dim=1)).Q
