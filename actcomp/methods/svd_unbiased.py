"""Method ``"svd_unbiased"``: svd's rank-k form of the sample-mode unfolding, with the tail
sampled so that the estimate of the input, and every weight gradient from it, is unbiased.

The k terms are the principal singular triplets (kept exactly) and triplets drawn from the tail
with probability proportional to the singular value, each rescaled by the inverse probability
(:func:`actcomp.linalg.sampled.sampled_svd`): E[X~] = X, the same rank and bytes as ``"svd"``.
"""

from __future__ import annotations

import math
from torch import Tensor

from actcomp.linalg.factors import LowRank
from actcomp.linalg.sampled import sampled_svd
from actcomp.methods.base import InputLayout, register_method
from actcomp.methods.draws import Draws, SampledCompressor


@register_method
class UnbiasedSVD(SampledCompressor):
    """Rank-k factors of the sample-mode unfolding, k by eps; principal triplets kept, the
    tail sampled and rescaled (E[left @ right] = the input)."""

    name = "svd_unbiased"
    neighbour_method = "svd"

    def compress(self, x: Tensor, layout: InputLayout, state: Draws) -> LowRank:
        rows = math.prod(x.shape[: layout.sample_modes])
        return sampled_svd(x.reshape(rows, *x.shape[layout.sample_modes :]), self.config.eps, state.next_generator())

    def ranks(self, factors: LowRank) -> tuple[int, ...]:  # type: ignore[override]
        return (factors.rank,)
