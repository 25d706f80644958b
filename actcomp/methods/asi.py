"""Method ``"asi"``: Tucker factors with warm-started subspaces for the non-batch modes.

Each non-batch mode keeps its factor from the previous step and refines it with one step of
subspace iteration; it is used only when it still explains at least eps of ||X||_F^2, else the
mode is recomputed by Gram + eigh (see :func:`actcomp.linalg.decompose.tracked_hosvd`). The per-layer
state is a :class:`~actcomp.linalg.decompose.SubspaceTracker`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from actcomp.linalg.tracked import SubspaceTracker, tracked_hosvd
from actcomp.linalg.factors import Tucker
from actcomp.methods.base import Compressor, InputLayout, register_method


@register_method
class ASI(Compressor):
    """Warm-started subspace iteration per non-batch mode, adaptive rank, eps checked each step."""

    name = "asi"

    def new_state(self) -> SubspaceTracker:
        return SubspaceTracker()

    def compress(self, x: Tensor, layout: InputLayout, state: SubspaceTracker) -> Tucker:
        return tracked_hosvd(x, self.config.eps, state)

    def ranks(self, factors: Tucker) -> tuple[int, ...]:  # type: ignore[override]
        return factors.ranks

    def state_dict(self, state: SubspaceTracker | None) -> dict[str, Any]:
        if state is None:
            return {}
        return {
            "margin": state.margin,
            "factors": {str(mode): u for mode, u in state.factors.items()},
            "recomputed": state.recomputed,
            "steps": state.steps,
        }

    def load_state_dict(self, data: dict[str, Any]) -> SubspaceTracker:
        if not data:
            return SubspaceTracker()
        factors = {}
        for mode, u in data.get("factors", {}).items():
            if not isinstance(u, torch.Tensor) or u.ndim != 2:
                raise ValueError(f"asi state: the factor of mode {mode} must be a matrix, got {type(u).__name__}")
            factors[int(mode)] = u
        return SubspaceTracker(
            margin=int(data.get("margin", 2)), factors=factors,
            recomputed=int(data.get("recomputed", 0)), steps=int(data.get("steps", 0)),
        )
