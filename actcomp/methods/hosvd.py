"""Method ``"hosvd"``: a Tucker factorisation over every mode of the input.

The modes are truncated one after another, smallest first: mode n's factor U_n holds the top
eigenvectors of the Gram matrix of the unfolding of X already projected on the earlier modes,
K_n the smallest rank explaining a fraction eps of that tensor's energy, so that
||X - X~||^2 <= (1 - eps^N) ||X||^2; the core is the last projected tensor (see
:func:`actcomp.linalg.decompose.hosvd`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from actcomp.linalg.decompose import hosvd
from actcomp.linalg.factors import Tucker
from actcomp.methods.base import Compressor, InputLayout, register_method


@register_method
class HOSVD(Compressor):
    """Tucker factors of every mode, ranks by explained variance eps."""

    name = "hosvd"

    def compress(self, x: Tensor, layout: InputLayout, state: Any) -> Tucker:
        return hosvd(x, self.config.eps)

    def ranks(self, factors: Tucker) -> tuple[int, ...]:  # type: ignore[override]
        return factors.ranks
