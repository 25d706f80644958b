"""The objects a compressed layer keeps for backward instead of its input.

Both are plain, immutable containers of detached, contiguous tensors. They know their size in
bytes (what autograd keeps) and how to rebuild the tensor they approximate (used by tests and
by error measurements, never by the kernels' hot path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _mode_product(x: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """x x_mode matrix: contract mode ``mode`` of x (size I) with the columns of ``matrix`` (J, I)."""
    return torch.tensordot(matrix, x, dims=([1], [mode])).movedim(0, mode)


@dataclass(frozen=True)
class LowRank:
    """A matrix-unfolding factorisation ``X_(0) ~ left @ right``.

    ``left`` is (I_0, k) and ``right`` is (k, *shape[1:]): the tensor is approximated along its
    first mode by k pseudo-samples ``right[j]`` mixed by the columns of ``left``. When computed
    by :func:`actcomp.decompose.truncated_svd` one of the two factors has orthonormal rows or
    columns and ``left @ right`` is the rank-k truncated SVD of ``X_(0)``.
    """

    left: Tensor
    right: Tensor

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.left.shape[0], *self.right.shape[1:]))

    @property
    def nbytes(self) -> int:
        """Bytes held by the two factors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.left, self.right)

    def reconstruct(self) -> Tensor:
        """``left @ right`` reshaped to the original tensor's shape."""
        return (self.left @ self.right.reshape(self.rank, -1)).reshape(self.shape)

    def to(self, dtype: torch.dtype) -> "LowRank":
        return LowRank(self.left.to(dtype), self.right.to(dtype))


@dataclass(frozen=True)
class Tucker:
    """A Tucker factorisation ``X ~ core x_0 U_0 x_1 U_1 ... x_{N-1} U_{N-1}``.

    ``core`` has shape (K_0, ..., K_{N-1}) and ``factors[n]`` is (I_n, K_n) with orthonormal
    columns when computed by :func:`actcomp.decompose.hosvd`, so that ``core = X x_n U_n^T``
    for every mode and ``reconstruct()`` is the orthogonal projection of X on the product of
    the mode subspaces.
    """

    core: Tensor
    factors: tuple[Tensor, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.core.shape)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(int(u.shape[0]) for u in self.factors)

    @property
    def nbytes(self) -> int:
        """Bytes held by the core and the factor matrices."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.core, *self.factors)

    def reconstruct(self) -> Tensor:
        """``core x_0 U_0 x_1 U_1 ...``: the tensor the factors stand for."""
        x = self.core
        for mode, u in enumerate(self.factors):
            x = _mode_product(x, u, mode)
        return x.contiguous()

    def to(self, dtype: torch.dtype) -> "Tucker":
        return Tucker(self.core.to(dtype), tuple(u.to(dtype) for u in self.factors))


Factors = LowRank | Tucker
