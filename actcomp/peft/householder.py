"""Products of Householder reflections: sequential, and in blocked WY form (FastH).

A reflection with vector v (any nonzero length) is H(v) = I - 2 v v^T / ||v||^2. The product
Q = H(v_1) H(v_2) ... H(v_r) is orthogonal. Applying it one reflection at a time costs r
rank-one updates that must run in sequence. The blocked WY form groups m consecutive
reflections: with Y = [y_1 ... y_m] the normalised vectors of a block (d x m),

    H(y_1) ... H(y_m) = I - Y T Y^T,    T^-1 = I/2 + triu(Y^T Y, 1)

(T upper triangular; the diagonal 1/2 is 1/tau for tau = 2). So a block acts on x (d x n) as
x - (Y T)(Y^T x): two matrix products with m columns instead of m rank-one updates. All blocks'
Y T are computed at once by one batched triangular solve (Y T = Y (T^-1)^-1, solved from the
right), and Q x = B_1 (B_2 (... (B_k x))) applies the blocks last first: r / m steps in
sequence instead of r. Everything is plain torch (matmul, torch.linalg.solve_triangular), so
autograd differentiates it; no compiled extension.

Block size: the default 32 is the fastest on the measured 2-core CPU for d = 256..1024 with
r = d reflections, forward and forward+backward (``python bench/householder.py``, block
sweep in BENCHMARKS.md); larger blocks do more triangular-solve and matmul work per step,
smaller ones more steps in sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_BLOCK_SIZE = 32


def _check(vectors: Tensor, x: Tensor) -> None:
    if vectors.ndim != 2:
        raise ValueError(f"reflection vectors must be a 2-D tensor (r, d), one vector per row; got shape {tuple(vectors.shape)}")
    if x.ndim < 2 or x.shape[-2] != vectors.shape[1]:
        raise ValueError(
            f"x must have shape (..., d, n) with d = {vectors.shape[1]} (the vectors' length); got {tuple(x.shape)}"
        )


def wy_blocks(vectors: Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> list[tuple[Tensor, Tensor]]:
    """The blocked WY form of Q = H(v_1) ... H(v_r): per block of m consecutive rows of
    ``vectors`` (r, d), the pair (Y^T, Y T) with Y^T (m, d) the normalised vectors and
    Y T (d, m), where T^-1 = I/2 + triu(Y^T Y, 1); the block equals I - (Y T) Y^T.

    The r // m full blocks share one batched triangular solve; a last block of r mod m
    reflections gets its own. Blocks are returned first to last (block j holds rows
    j*m .. j*m + m - 1).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    r, d = vectors.shape
    y = vectors / vectors.norm(dim=1, keepdim=True)
    full = (r // block_size) * block_size
    groups = []
    if full:
        groups.append(y[:full].reshape(-1, block_size, d))
    if r > full:
        groups.append(y[full:].unsqueeze(0))
    blocks = []
    for yt_rows in groups:  # (b, m, d): each block's Y^T
        m = yt_rows.shape[1]
        eye = torch.eye(m, dtype=y.dtype, device=y.device)
        t_inverse = (yt_rows @ yt_rows.mT).triu(1) + 0.5 * eye
        y_t = torch.linalg.solve_triangular(t_inverse, yt_rows.mT, upper=True, left=False)  # Y T = Y (T^-1)^-1
        blocks += list(zip(yt_rows.unbind(0), y_t.unbind(0)))
    return blocks


def householder_apply(vectors: Tensor, x: Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> Tensor:
    """Q x for Q = H(v_1) H(v_2) ... H(v_r), in blocked WY form.

    ``vectors`` is (r, d), one reflection vector v_i per row (any nonzero length: H(v) =
    I - 2 v v^T / ||v||^2); ``x`` is (..., d, n). Each block B = I - Y T Y^T acts as
    x - (Y T)(Y^T x); the blocks apply last first. r = 0 returns x. Differentiable in
    ``vectors`` and ``x`` by autograd. A zero vector gives NaN (its reflection is undefined).
    """
    _check(vectors, x)
    for yt_rows, y_t in reversed(wy_blocks(vectors, block_size)):
        x = x - y_t @ (yt_rows @ x)
    return x


def householder_product(vectors: Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> Tensor:
    """The dense d x d matrix Q = H(v_1) ... H(v_r) (blocked WY applied to the identity)."""
    eye = torch.eye(vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    return householder_apply(vectors, eye, block_size)


def householder_sequential(vectors: Tensor, x: Tensor) -> Tensor:
    """Q x one reflection at a time (the reference): for i = r .. 1,
    x <- x - 2 v_i (v_i^T x) / ||v_i||^2. r rank-one updates in sequence."""
    _check(vectors, x)
    for v in vectors.flip(0):
        x = x - (2 / (v @ v)) * v.unsqueeze(1) * (v @ x).unsqueeze(-2)
    return x
