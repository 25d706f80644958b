"""The family-independent part of second-order statistics from factors: what a family's
:class:`~actcomp.kernels.base.SecondOrder` functions return, and the algebra they share.

* :class:`RowRoot`: a layer's processed input rows a = P Y (n x D) with P (n x r) orthonormal and
  never formed; its :meth:`RowRoot.root` Z has Z Z^T = [a, 1]^T [a, 1] / n, KFAC's activation
  factor A (SINGD), from r columns instead of n rows (:mod:`actcomp.optim.roots` has the
  construction).
* :class:`SampleFactors`: HyLo's per-sample input rows I = L R (n x D) with L (n x k) and
  R (k x D), never formed (:mod:`actcomp.optim.samples`).

Both start from the factors' Tucker view X = S x_0 U_0 x_1 U_1 ... (a mode without a factor is
stored in full: :meth:`actcomp.linalg.factors.Tucker.tucker_view`). Orthonormalising the row
modes' factors, U_i = Q_i R_i, folds R_i into the core and leaves P = Q_0 (x) Q_1 ...; the
column sums of P are the Kronecker product of those of the Q_i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from actcomp.linalg.factors import mode_product

APPROXIMATIONS = ("expand", "reduce")  # KFAC's processing of the rows (SINGD's kfac_approx)


def check_approx(approx: str) -> None:
    """ValueError unless ``approx`` is one of :data:`APPROXIMATIONS`."""
    if approx not in APPROXIMATIONS:
        raise ValueError(f"kfac_approx must be one of {', '.join(APPROXIMATIONS)}, got {approx!r}")


def mode_size(core: Tensor, factor: Tensor | None, mode: int) -> int:
    """The size of mode ``mode`` of the tensor a (core, factors) pair stands for."""
    return int(core.shape[mode] if factor is None else factor.shape[0])


def orthonormal_mode(core: Tensor, factor: Tensor | None, mode: int) -> tuple[Tensor, Tensor]:
    """Fold the triangular part of a mode's factor into the core: with U = Q R (reduced QR),
    S x_n U = (S x_n R) x_n Q. Returns (S x_n R, Q^T 1), the core and the column sums of the
    orthonormal Q. A mode without a factor is an identity block: (S, ones)."""
    if factor is None:
        return core, core.new_ones(core.shape[mode])
    q, r = torch.linalg.qr(factor)
    return mode_product(core, r, mode), q.sum(0)


def mean_mode(core: Tensor, factor: Tensor | None, mode: int) -> Tensor:
    """The core of the tensor averaged over mode ``mode`` (kept with size 1): S x_n (1^T U / I)."""
    if factor is None:
        return core.mean(mode, keepdim=True)
    return mode_product(core, factor.mean(0, keepdim=True), mode)


def kron_vectors(vectors: list[Tensor]) -> Tensor:
    """v_0 (x) v_1 (x) ... (the first vector varies slowest, as a row-major reshape)."""
    out = vectors[0]
    for v in vectors[1:]:
        out = torch.outer(out, v).reshape(-1)
    return out


def kron_matrices(matrices: list[Tensor]) -> Tensor:
    """M_0 (x) M_1 (x) ... (the Kronecker product, the first factor varying slowest)."""
    out = matrices[0]
    for m in matrices[1:]:
        out = torch.kron(out, m)
    return out


@dataclass(frozen=True)
class RowRoot:
    """Processed input rows a = P Y with P (rows x r) orthonormal and never formed.

    ``coefficients`` is Y (r x D); ``ones`` is P^T 1 (r,); ``rows`` is n, the number of rows.
    """

    coefficients: Tensor
    ones: Tensor
    rows: int

    def root(self, bias: bool) -> Tensor:
        """Z (D x r, or D+1 x r+1 with a bias) with Z Z^T = [a, 1]^T [a, 1] / n (the ones
        column only with ``bias``): the ones column is 1_n = P (P^T 1_n) + r with P^T r = 0, so

            Z = [[Y^T, 0], [(P^T 1_n)^T, ||r||]],   ||r||^2 = n - ||P^T 1_n||^2.
        """
        y = self.coefficients
        z = y.T
        if bias:
            residual = max(float(self.rows) - float(self.ones @ self.ones), 0.0)
            top = torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1)
            last = torch.cat([self.ones, self.ones.new_tensor([math.sqrt(residual)])])
            z = torch.cat([top, last.unsqueeze(0)], dim=0)
        return z / math.sqrt(self.rows)


@dataclass(frozen=True)
class SampleFactors:
    """Per-sample rows I = left @ right: ``left`` (n x k), ``right`` (k x D), or I = left
    when ``right`` is None (a plain layer's rows, kept in full)."""

    left: Tensor
    right: Tensor | None = None

    @property
    def samples(self) -> int:
        return int(self.left.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.left, self.right) if t is not None)

    def gram(self) -> Tensor:
        """I I^T = L (R R^T) L^T (n x n)."""
        if self.right is None:
            return self.left @ self.left.T
        return self.left @ (self.right @ self.right.T) @ self.left.T

    def squared_norms(self) -> Tensor:
        """||I_j||^2 for every row j, from the k x k Gram R R^T."""
        if self.right is None:
            return (self.left * self.left).sum(1)
        return ((self.left @ (self.right @ self.right.T)) * self.left).sum(1)

    def times_transposed(self, m: Tensor) -> Tensor:
        """I M^T (n x rows of M), as L (R M^T)."""
        if self.right is None:
            return self.left @ m.T
        return self.left @ (self.right @ m.T)

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """W^T I for W (n x m): sum_j W_j^T I_j (m x D), as (W^T L) R."""
        out = weights.T @ self.left
        return out if self.right is None else out @ self.right

    def rows(self, index: Tensor) -> "SampleFactors":
        """The samples ``index`` (R is shared)."""
        return SampleFactors(self.left[index], self.right)

    def with_ones(self) -> "SampleFactors":
        """[I, 1]: the bias column."""
        ones = self.left.new_ones(self.samples, 1)
        if self.right is None:
            return SampleFactors(torch.cat([self.left, ones], dim=1))
        right = torch.block_diag(self.right, self.right.new_ones(1, 1))
        return SampleFactors(torch.cat([self.left, ones], dim=1), right)

    def reconstruct(self) -> Tensor:
        """I itself (tests and diagnostics)."""
        return self.left if self.right is None else self.left @ self.right
