"""Numerical building blocks shared by the decompositions of :mod:`actcomp.linalg`.

Pure functions on tensors, used by :mod:`~actcomp.linalg.decompose` (hosvd, truncated_svd),
:mod:`~actcomp.linalg.tracked` (asi's warm-started subspaces) and
:mod:`~actcomp.linalg.syncfree`: the compute dtype (float32, float64 for float64 input),
tensors that own exactly their storage, exact power-of-two scaling of inputs whose squares
would overflow (on the host, or on the device without a sync), mode unfoldings and their Gram
matrices G_n = X_(n) X_(n)^T, the explained-variance rank (smallest k with
sum_{i<k} lambda_i >= eps sum_i lambda_i), orthonormalisation (Householder QR, or CholeskyQR
without a host sync), completing a basis with random directions, one-copy host/device
transfers, and running small host work on one thread. Not part of the public API.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from numbers import Real
from typing import Iterator

import torch
from torch import Tensor


class NonFiniteActivationError(FloatingPointError):
    """The tensor to decompose holds NaN or Inf: no subspace can be chosen from it."""


def check_eps(eps: object) -> float:
    """Return ``eps`` as a float if it is a real number in (0, 1], else raise ValueError."""
    if isinstance(eps, bool) or not isinstance(eps, Real) or not (0.0 < float(eps) <= 1.0):
        raise ValueError(
            f"eps must be a number in (0, 1] (the fraction of explained variance to keep), got {eps!r}"
        )
    return float(eps)


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def own(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype``, contiguous and owning exactly its storage: a slice would keep the whole
    tensor it was cut from alive (a (n, 1) column slice even counts as contiguous)."""
    t = t.to(dtype).contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def rank_tensor(eigenvalues_desc: Tensor, eps: float) -> Tensor:
    """Smallest k with sum_{i<k} lambda_i >= eps * sum_i lambda_i, as a 0-d tensor (no sync)."""
    n = eigenvalues_desc.shape[-1]
    if eps >= 1.0:
        return torch.tensor(n, device=eigenvalues_desc.device)
    energy = eigenvalues_desc.clamp_min(0).cumsum(-1)
    k = (energy < eps * energy[..., -1:]).sum(-1) + 1
    return k.clamp_max(n)


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
def one_thread() -> Iterator[None]:
    """Run the enclosed host work on one intra-op thread, then restore the setting.

    Used for the eigen-decompositions and QR factorisations (small matrices: a tridiagonal
    reduction synchronises its threads at every column) and for products on small tensors
    (:func:`threads_for`). On a machine whose cores are busy with other work each of those
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


def orth(m: Tensor) -> Tensor:
    """Orthonormal basis Q of the columns of m (Householder QR, one thread on the host): QR keeps
    the span of every leading set of columns, so Q's first k columns span m's first k."""
    if m.device.type != "cpu":
        return torch.linalg.qr(m).Q
    with one_thread():
        return torch.linalg.qr(m).Q


def finite_scaled(x: Tensor) -> tuple[Tensor, float]:
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
    xc = x.detach().to(compute_dtype(x))
    low, high = torch.aminmax(xc)
    amax = max(-float(low), float(high))
    if not math.isfinite(amax):
        raise NonFiniteActivationError("the activation holds NaN or Inf values")
    info = torch.finfo(xc.dtype)
    if amax == 0.0 or (amax * amax * xc.numel() < info.max / 64 and amax * amax > info.tiny * 2.0**24):
        return xc, 1.0
    scale = math.ldexp(1.0, math.frexp(amax)[1])
    return xc / scale, scale


def unscaled(core: Tensor, scale: float | Tensor) -> Tensor:
    """The core of a decomposition of x / scale turned into the core of x."""
    return core if isinstance(scale, float) and scale == 1.0 else core * scale


def _power_of_two(exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """2^exponent in ``dtype`` (float32 or float64), built from its bits: exact, on the device."""
    if dtype == torch.float64:
        return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def device_scaled(xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(xc / 2^e, 2^e, max|xc|) with max|xc| = m 2^e, m in [0.5, 1), all on xc's device and
    without a host read. Exact as in :func:`finite_scaled`, but always applied (deciding would
    need the host). NaN or Inf leave xc unscaled and show in max|xc|, which the caller checks."""
    low, high = torch.aminmax(xc)
    amax = torch.maximum(-low, high)
    limit = 1022 if xc.dtype == torch.float64 else 126  # 2^±limit is a normal number
    exponent = torch.frexp(amax).exponent
    exponent = torch.where(torch.isfinite(amax) & (amax > 0), exponent, 0).clamp(-limit, limit)
    scale = _power_of_two(exponent, xc.dtype)
    return xc / scale, scale, amax


_FEW_SLICES = 64  # a middle mode with at most this many slices before it is handled in place


class Unfolding:
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
            return slice_gram(self.v)
        return self.m.T @ self.m if self.wide else self.m @ self.m.T

    def factor(self, vectors: Tensor) -> Tensor:
        """U_n from orthonormal vectors of :meth:`gram`'s leading subspace: themselves, or
        orth(X_(n) V) when wide (X_(n) V spans the same subspace of the mode as V of the rest)."""
        return orth(self.m @ vectors) if self.wide else vectors

    def project(self, u: Tensor) -> tuple[Tensor, list[int]]:
        """y x_n U^T and its axes. A last mode comes out first (U^T X_(n) is laid out that
        way), which puts the mode before it last for the next step."""
        ut, shape, p = u.T.contiguous(), self.y.shape, self.p
        k = u.shape[1]
        if self.m is None:
            return torch.matmul(ut, self.v).reshape(*shape[:p], k, *shape[p + 1 :]), self.axes
        if self.v.shape[0] == 1:
            return (ut @ self.m).reshape(*shape[:p], k, *shape[p + 1 :]), self.axes
        # the mode last, or followed by modes of size 1 only: it comes out first
        return (ut @ self.m).reshape(k, *shape[:p], *shape[p + 1 :]), [self.mode] + self.axes[:p] + self.axes[p + 1 :]


def slice_gram(v: Tensor) -> Tensor:
    """sum_i v[i] v[i]^T for v of shape (before, I, after): a middle mode's Gram matrix in place."""
    before, size, after = v.shape
    if before * size * size <= v.numel():
        return torch.bmm(v, v.transpose(1, 2)).sum(0)
    gram = v[0] @ v[0].T
    for i in range(1, before):
        gram.addmm_(v[i], v[i].T)
    return gram


_PARALLEL_MIN_NUMEL = 1 << 22  # host tensors smaller than this are worked on by one thread


def threads_for(y: Tensor):
    """One intra-op thread for the products on a host tensor of fewer than 2^22 elements, the
    default otherwise. A truncation step reads its tensor about twice (Gram matrix, projection):
    at ~5 GB/s per core, 4M float32 elements take ~3 ms, about one scheduler tick. Each parallel
    product waits for all its threads at its end, and on a host whose cores are busy with other
    work that wait can take a tick, more than a second thread saves below that size (measured
    on the shared 2-core host: a 7 x 7 triu took 8.7 ms on two threads; whole-layer steps were
    up to 1.4x faster with the decomposition on one thread under load)."""
    return one_thread() if y.device.type == "cpu" and y.numel() < _PARALLEL_MIN_NUMEL else nullcontext()


def eigen_desc(gram: Tensor, eps: float) -> tuple[Tensor, int]:
    """Eigenvectors of a host Gram matrix, largest eigenvalue first, and the eps rank."""
    with one_thread():
        values, vectors = torch.linalg.eigh(gram)
    return vectors.flip(-1), int(rank_tensor(values.flip(-1), eps))


def _unfold(x: Tensor, mode: int) -> Tensor:
    """The mode-``mode`` unfolding X_(n), shape (I_n, rest)."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def _is_wide(x: Tensor, mode: int) -> bool:
    """Mode larger than the rest of the tensor: its Gram matrix is the larger of the two."""
    return x.shape[mode] > x.numel() // x.shape[mode]


def small_gram(x: Tensor, mode: int) -> Tensor:
    """The smaller Gram matrix of the mode-n unfolding: X_(n) X_(n)^T, or X_(n)^T X_(n) for a
    wide mode (same non-zero eigenvalues)."""
    if _is_wide(x, mode):
        m = _unfold(x, mode)
        return m.T @ m
    return mode_gram(x, mode)


def mode_factor(x: Tensor, mode: int, vectors: Tensor) -> Tensor:
    """The mode-n factor from eigenvectors of :func:`small_gram`: themselves, or for a wide
    mode orth(X_(n) V) (X_(n) V has orthogonal columns of norms sqrt(lambda)). QR keeps the
    span of every leading set of columns, so a factor's first k columns are the rank-k one."""
    if _is_wide(x, mode):
        return orth(_unfold(x, mode) @ vectors.to(x.device, x.dtype))
    return vectors


def to_host(tensors: list[Tensor], dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Copy tensors to the host in one transfer (the one sync), in ``dtype``."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def to_device(tensors: list[Tensor], like: Tensor) -> list[Tensor]:
    """Host tensors to ``like``'s device and dtype in one non-blocking copy from pinned memory
    (no sync); on the CPU only the dtype changes."""
    if like.device.type == "cpu" or not tensors:
        return [t.to(like.dtype) for t in tensors]
    packed = torch.cat([t.reshape(-1).to(like.dtype) for t in tensors]).pin_memory().to(like.device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(packed.split([t.numel() for t in tensors]), tensors)]


def cholesky_qr(z: Tensor) -> Tensor:
    """Q = Z R^-1 with orthonormal columns and R upper triangular (so Q's first j columns span
    Z's first j), without a host sync: shifted CholeskyQR (the shift of Fukaya et al., 2020,
    makes the first Cholesky factorisation succeed for any full-rank Z), then CholeskyQR twice,
    each with a shift of u trace(Z^T Z) (u the unit round-off: the matrix is then close to the
    identity, and the shift keeps it positive definite through round-off); Q^T Q = I up to
    about r u. Needs Z of full column rank."""
    rows, r = z.shape
    unit = torch.finfo(z.dtype).eps
    for c in (11.0 * (rows * r + r * (r + 1)), 1.0, 1.0):
        a = z.T @ z
        a.diagonal().add_(c * unit * a.diagonal().sum())
        upper, _ = torch.linalg.cholesky_ex(a, upper=True)
        z = torch.linalg.solve_triangular(upper, z, upper=True, left=False)
    return z


def grow(q: Tensor, rank: int, generator: torch.Generator | None = None) -> Tensor:
    """The first ``rank`` columns of the orthonormal q, completed when q has fewer with random
    directions made orthogonal to q (deflated twice, then :func:`cholesky_qr`).

    With ``generator`` the directions are drawn on q's device from it (no host sync: the
    sync-free method's path); without, from a fixed host sketch seeded by q's shape and
    ``rank`` (deterministic, the global RNG untouched) copied to q's device."""
    if rank <= q.shape[1]:
        return q[:, :rank].contiguous()
    if generator is None:
        seeded = torch.Generator(device="cpu").manual_seed(q.shape[0] * 7919 + rank)
        (extra,) = to_device([torch.randn(q.shape[0], rank - q.shape[1], generator=seeded, dtype=torch.float64)], q)
    else:
        extra = torch.randn(q.shape[0], rank - q.shape[1], generator=generator, device=q.device, dtype=q.dtype)
    for _ in range(2):
        extra = extra - q @ (q.T @ extra)
    return torch.cat([q, cholesky_qr(extra)], dim=1)
