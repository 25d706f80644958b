"""Method ``"svd"``: a rank-k factorisation of the unfolding whose rows are samples.

The input is unfolded with its sample modes (the layout's ``sample_modes``: the batch mode of a
convolution, every leading mode of a Linear input) as rows, X_rows ~ L R, with k the smallest
rank explaining a fraction eps of ||X||_F^2 (:func:`actcomp.linalg.decompose.truncated_svd`). ``R``
keeps the trailing shape: (k, C, *spatial) for a convolution, (k, C) for Linear.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from actcomp.linalg.decompose import truncated_svd
from actcomp.linalg.factors import LowRank
from actcomp.methods.base import Compressor, InputLayout, register_method


@register_method
class SVD(Compressor):
    """Rank-k truncated SVD of the sample-mode unfolding, k by explained variance eps."""

    name = "svd"

    def compress(self, x: Tensor, layout: InputLayout, state: Any) -> LowRank:
        rows = math.prod(x.shape[: layout.sample_modes])
        return truncated_svd(x.reshape(rows, *x.shape[layout.sample_modes :]), self.config.eps)

    def ranks(self, factors: LowRank) -> tuple[int, ...]:  # type: ignore[override]
        return (factors.rank,)
