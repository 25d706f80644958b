"""Method ``"hosvd"``: a Tucker factorisation over every mode of the input.

For every mode n the factor U_n holds the top eigenvectors of the Gram matrix of the mode-n
unfolding, K_n the smallest rank whose eigenvalues explain a fraction eps of ||X||_F^2; the
core is S = X x_0 U_0^T x_1 U_1^T ... (see :func:`actcomp.decompose.hosvd`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from actcomp.decompose import hosvd
from actcomp.factors import Tucker
from actcomp.methods import Compressor, InputLayout, register_method


@register_method
class HOSVD(Compressor):
    """Tucker factors of every mode, ranks by explained variance eps."""

    name = "hosvd"

    def compress(self, x: Tensor, layout: InputLayout, state: Any) -> Tucker:
        return hosvd(x, self.config.eps)

    def ranks(self, factors: Tucker) -> tuple[int, ...]:  # type: ignore[override]
        return factors.ranks
