"""The objects a compressed layer keeps for backward instead of its input.

Each is a plain, immutable container of detached, contiguous tensors. It knows its size in
bytes (what autograd keeps), how to rebuild the tensor it approximates (used by tests and by
error measurements, never by the kernels' hot path), and how to be taken apart into tensors for
``ctx.save_for_backward`` and put together again (:meth:`tensors`, :meth:`meta`,
:meth:`from_tensors`). A layer family's kernel has one weight-gradient function per factor type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def mode_product(x: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """The mode-n product ``x x_n M``: every mode-n fibre f of x (size I) becomes M f (size J).

    ``matrix`` is (J, I); the result has x's shape with mode ``mode`` of size J. Tucker
    reconstruction is ``S x_0 U_0 x_1 U_1 ...`` and projection onto a factor is ``x x_n U^T``.
    """
    return torch.tensordot(matrix, x, dims=([1], [mode])).movedim(0, mode)


class _Parts:
    """Taking a factorisation apart for ``save_for_backward`` and putting it together again."""

    def tensors(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def meta(self) -> dict:
        """The non-tensor fields :meth:`from_tensors` needs besides the tensors."""
        return {}

    @classmethod
    def from_tensors(cls, tensors: tuple[Tensor, ...], **meta: object):
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    #: Why :meth:`tucker_view` is refused, for a factor type that does not determine the input.
    no_tucker_view = "it does not determine the input"

    def tucker_view(self) -> tuple[Tensor, list[Tensor | None]]:
        """The factorisation as X = S x_0 U_0 x_1 U_1 ...: the core S and one factor per mode,
        None where the mode is stored in full (what second-order statistics are built from).
        TypeError for a factor type that does not determine the input."""
        raise TypeError(
            f"second-order statistics need Tucker or LowRank factors of the input, got {type(self).__name__} "
            f"({self.no_tucker_view}): compress this layer with hosvd, asi or svd, or leave it out of the optimizer"
        )


@dataclass(frozen=True)
class LowRank(_Parts):
    """A matrix-unfolding factorisation ``X_(0) ~ left @ right``.

    ``left`` is (I_0, k) and ``right`` is (k, *shape[1:]): the tensor is approximated along its
    first mode by k pseudo-samples ``right[j]`` mixed by the columns of ``left``. When computed
    by :func:`actcomp.linalg.decompose.truncated_svd` one of the two factors has orthonormal rows or
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

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.left, self.right)

    @classmethod
    def from_tensors(cls, tensors: tuple[Tensor, ...], **meta: object) -> "LowRank":
        left, right = tensors
        return cls(left, right)

    def tucker_view(self) -> tuple[Tensor, list[Tensor | None]]:
        """X = R x_0 L: the core ``right`` with ``left`` on the first mode, the other modes
        stored in full (None)."""
        return self.right, [self.left, *([None] * (self.right.ndim - 1))]

    def reconstruct(self) -> Tensor:
        """``left @ right`` reshaped to the original tensor's shape."""
        return (self.left @ self.right.reshape(self.rank, -1)).reshape(self.shape)

    def to(self, dtype: torch.dtype) -> "LowRank":
        return LowRank(self.left.to(dtype), self.right.to(dtype))


@dataclass(frozen=True)
class Tucker(_Parts):
    """A Tucker factorisation ``X ~ core x_0 U_0 x_1 U_1 ... x_{N-1} U_{N-1}``.

    ``core`` has shape (K_0, ..., K_{N-1}) and ``factors[n]`` is (I_n, K_n) with orthonormal
    columns when computed by :func:`actcomp.linalg.decompose.hosvd`, so that ``core = X x_n U_n^T``
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

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.core, *self.factors)

    @classmethod
    def from_tensors(cls, tensors: tuple[Tensor, ...], **meta: object) -> "Tucker":
        return cls(tensors[0], tuple(tensors[1:]))

    def tucker_view(self) -> tuple[Tensor, list[Tensor | None]]:
        """(core, [U_0, U_1, ...]): every mode has a factor."""
        return self.core, list(self.factors)

    def reconstruct(self) -> Tensor:
        """``core x_0 U_0 x_1 U_1 ...``: the tensor the factors stand for."""
        # Mode by mode, always contracting the first axis and appending the new one last
        # (x (K_n, rest) -> (rest, I_n)): after N products the modes are back in order, every
        # product is one matrix multiply of views, and no intermediate is copied.
        x = self.core
        for u in self.factors:
            rest = x.shape[1:]
            x = (x.reshape(x.shape[0], math.prod(rest)).t() @ u.t()).reshape(*rest, u.shape[0])
        return x.contiguous()

    def to(self, dtype: torch.dtype) -> "Tucker":
        return Tucker(self.core.to(dtype), tuple(u.to(dtype) for u in self.factors))


@dataclass(frozen=True)
class PatchMeans(_Parts):
    """A tensor (B, C, *spatial) averaged over non-overlapping regions of ``region`` elements
    per spatial side (the last region of a side may be partial): what Gradient Filter keeps.

    ``means`` is (B, C, *ceil(spatial / region)). It does not determine the tensor; the filter
    assumes the tensor constant within each region (:meth:`reconstruct` repeats the means).
    """

    means: Tensor
    region: tuple[int, ...]

    no_tucker_view = "gradient_filter keeps patch means, which do not determine the input"

    @property
    def shape(self) -> torch.Size:
        return self.means.shape

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.means,)

    def meta(self) -> dict:
        return {"region": self.region}

    @classmethod
    def from_tensors(cls, tensors: tuple[Tensor, ...], **meta: object) -> "PatchMeans":
        (means,) = tensors
        return cls(means, tuple(meta["region"]))  # type: ignore[arg-type]

    def reconstruct(self) -> Tensor:
        """The means repeated over their regions (the filter's piecewise-constant input)."""
        x = self.means
        for d, r in enumerate(self.region):
            x = x.repeat_interleave(r, dim=2 + d)
        return x

    def to(self, dtype: torch.dtype) -> "PatchMeans":
        return PatchMeans(self.means.to(dtype), self.region)


Factors = LowRank | Tucker | PatchMeans

_mode_product = mode_product  # former private name, kept for code written against it
