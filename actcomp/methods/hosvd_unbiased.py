"""Method ``"hosvd_unbiased"``: hosvd's Tucker form and ranks, with the tail sampled so that
the estimate of the input, and so every weight gradient computed from it, is unbiased.

Truncating at eps drops the same low-energy directions of a layer's input at every step; the
weight gradient then misses their contribution at every step, a bias the optimizer adds up (on
the demo task, hosvd at eps 0.9 loses 23 points on full batches). Here each mode keeps its
principal directions exactly and draws the rest of its rank from the tail with probability
proportional to the singular value, rescaled by the inverse probability
(:func:`actcomp.linalg.sampled.sampled_hosvd`): E[X~] = X, same ranks and bytes as ``"hosvd"``.
"""

from __future__ import annotations

from torch import Tensor

from actcomp.linalg.factors import Tucker
from actcomp.linalg.sampled import sampled_hosvd
from actcomp.methods.base import InputLayout, register_method
from actcomp.methods.draws import Draws, SampledCompressor


@register_method
class UnbiasedHOSVD(SampledCompressor):
    """Tucker factors of every mode with hosvd's ranks at eps; principal directions kept, the
    tail sampled and rescaled (E[factors' reconstruction] = the input)."""

    name = "hosvd_unbiased"

    def compress(self, x: Tensor, layout: InputLayout, state: Draws) -> Tucker:
        return sampled_hosvd(x, self.config.eps, state.next_generator())

    def ranks(self, factors: Tucker) -> tuple[int, ...]:  # type: ignore[override]
        return factors.ranks
