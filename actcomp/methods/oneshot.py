"""Method ``"oneshot"``: bases computed once by an HOSVD, then every step only projects.

The non-sample modes (a convolution's channel and spatial modes, a Linear's features) get
fixed bases from calibration (:func:`actcomp.calibrate` over a few batches, or the first
training step); each step projects the input on them (mode products, no decomposition) and
truncates the sample modes (the batch) at eps from the small projected core. The energy the F
fixed bases keep, ||Y||^2 / ||X||^2, is computed on the device every step (a fresh HOSVD keeps at
least eps^F); when it falls below (eps - ``tolerance``)^F the bases are refreshed by one HOSVD
(ranks re-chosen at eps). So the guarantee is ``hosvd``'s with eps - tolerance for each fixed
mode: ||X - X~||^2 <= (1 - (eps - tolerance)^F eps^S) ||X||^2 with S sample modes. On the host
it is checked every step, on an accelerator every ``check_every`` steps (see
:mod:`actcomp.linalg.projected`). At eps = 1 every step is an exact HOSVD. The per-layer state
is a :class:`~actcomp.linalg.projected.ProjectionState`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from actcomp.linalg.factors import Tucker
from actcomp.linalg.projected import ProjectionState, projected_tucker
from actcomp.methods.base import Compressor, InputLayout, Setting, register_method


def check_tolerance(value: object) -> float:
    """``value`` as a float in [0, 1), the slack below eps a fixed basis may keep before a refresh."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"tolerance must be a number in [0, 1) (how far below eps each fixed basis may fall before a refresh), got {value!r}")
    return float(value)


def check_steps(value: object) -> int:
    """``value`` if it is a whole number >= 1 (steps between two reads of the energy check on an accelerator)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"check_every must be a whole number >= 1 (steps between energy checks on an accelerator), got {value!r}")
    return value


@register_method
class OneShot(Compressor):
    """Fixed bases for the non-sample modes (refreshed when they keep less than (eps - tolerance)^F)."""

    name = "oneshot"
    settings = ("eps", "tolerance", "check_every")
    own_settings = (
        Setting("tolerance", 0.05, check_tolerance, "oneshot: refresh the F fixed bases when they keep less than (eps - tolerance)^F of the energy"),
        Setting("check_every", 8, check_steps, "oneshot: steps between energy checks on an accelerator (the host checks every step)"),
    )

    def setting(self) -> str:
        return f"eps={self.config.eps:g}, tolerance={self.config.tolerance:g}"

    def new_state(self) -> ProjectionState:
        return ProjectionState()

    def compress(self, x: Tensor, layout: InputLayout, state: ProjectionState) -> Tucker:
        return projected_tucker(
            x, self.config.eps, state, layout.sample_modes, self.config.tolerance, self.config.check_every
        )

    def ranks(self, factors: Tucker) -> tuple[int, ...]:  # type: ignore[override]
        return factors.ranks

    def state_dict(self, state: ProjectionState | None) -> dict[str, Any]:
        return {} if state is None else state.state_dict()

    def load_state_dict(self, data: dict[str, Any]) -> ProjectionState:
        return ProjectionState.from_state_dict(data) if data else ProjectionState()
