"""Products of Householder reflections: sequential, and in blocked WY form (FastH).

A reflection with vector v (any nonzero length) is H(v) = I - 2 v v^T / ||v||^2. The product
Q = H(v_1) H(v_2) ... H(v_r) is orthogonal. Applying it one reflection at a time costs r
rank-one updates that must run in sequence. The blocked WY form groups m consecutive
reflections: with Y = [y_1 ... y_m] the normalised vectors of a block (d x m),

    H(y_1) ... H(y_m) = I - Y T Y^T,    T^-1 = I/2 + triu(Y^T Y, 1)

(T upper triangular; the diagonal 1/2 is 1/tau for tau = 2). So a block acts on x (d x n) as
x - (Y T)(Y^T x): two matrix products with m columns instead of m rank-one updates. The code
uses the same form with the unnormalised vectors (see :func:`wy_blocks`). All blocks' Y T are
computed at once by one batched triangular solve, and Q x = B_1 (B_2 (... (B_k x))) applies
the blocks last first: r / m steps in sequence instead of r. Everything is plain torch (matmul, torch.linalg.solve_triangular), so
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
    ``vectors`` (r, d), the pair (V^T, V T) with V^T (m, d) the block's rows and V T (d, m),
    so that the block equals I - (V T) V^T.

    With Y = V D^-1 (D = diag ||v_i||), I - Y T_Y Y^T with T_Y^-1 = I/2 + triu(Y^T Y, 1) equals
    I - V T V^T with T^-1 = D T_Y^-1 D = triu(V^T V, 1) + diag(||v_i||^2) / 2: the vectors'
    lengths enter only this m x m matrix, so they are never normalised (no elementwise work, nor
    its backward, on the r x d vectors). The r // m full blocks share one batched triangular
    solve (V T = V (T^-1)^-1, solved from the right); a last block of r mod m reflections gets
    its own. Blocks are returned first to last (block j holds rows j*m .. j*m + m - 1).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    r, d = vectors.shape
    full = (r // block_size) * block_size
    groups = []
    if full:
        groups.append((vectors if full == r else vectors[:full]).reshape(-1, block_size, d))
    if r > full:
        groups.append(vectors[full:].unsqueeze(0))
    blocks = []
    for rows in groups:  # (b, m, d): each block's V^T
        gram = rows @ rows.mT
        t_inverse = gram.triu(1) + torch.diag_embed(gram.diagonal(dim1=-2, dim2=-1) / 2)
        v_t = torch.linalg.solve_triangular(t_inverse, rows.mT, upper=True, left=False)  # V T = V (T^-1)^-1
        blocks += list(zip(rows.unbind(0), v_t.unbind(0)))
    return blocks


def householder_apply(vectors: Tensor, x: Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> Tensor:
    """Q x for Q = H(v_1) H(v_2) ... H(v_r), in blocked WY form.

    ``vectors`` is (r, d), one reflection vector v_i per row (any nonzero length: H(v) =
    I - 2 v v^T / ||v||^2); ``x`` is (..., d, n). Each block B = I - V T V^T acts as
    x - (V T)(V^T x); the blocks apply last first. r = 0 returns x. Differentiable in
    ``vectors`` and ``x`` by autograd. A zero vector gives NaN (its reflection is undefined).
    """
    _check(vectors, x)
    for rows, v_t in reversed(wy_blocks(vectors, block_size)):
        x = x - v_t @ (rows @ x)
    return x


def householder_product(vectors: Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> Tensor:
    """The dense d x d matrix Q = H(v_1) ... H(v_r) (blocked WY applied to the identity)."""
    eye = torch.eye(vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    return householder_apply(vectors, eye, block_size)


def householder_sequential(vectors: Tensor, x: Tensor) -> Tensor:
    """Q x one reflection at a time (the reference): for i = r .. 1,
    x <- x - 2 v_i (v_i^T x) / ||v_i||^2. r rank-one updates in sequence."""
    _check(vectors, x)
    scaled = 2 * vectors / (vectors * vectors).sum(1, keepdim=True)  # 2 v_i / ||v_i||^2, all at once
    for i in range(vectors.shape[0] - 1, -1, -1):
        x = x - scaled[i].unsqueeze(1) @ (vectors[i].unsqueeze(0) @ x)
    return x
