"""Per-layer random draws for the sampled methods, reproducible from their carried state.

A sampled method (``hosvd_unbiased``, ``svd_unbiased``) draws which tail directions it keeps at
every step, for the compressed layers and (unless ``truncated_neighbours``) for the neighbours'
factors (BatchNorm's x_hat; see :func:`actcomp.policies.factor_config`). Its per-layer state
holds a seed (taken from torch's global generator when the layer is compressed, so
``torch.manual_seed`` makes a run reproducible) and a step count: step t's
draw uses a generator seeded by (seed, t), so the same state draws the same directions (a copy
of the state taken before a step reproduces that step's factors) and a saved state resumes the
sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from actcomp.methods.base import Compressor

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: steps of one layer map to distinct seeds
_MASK = (1 << 63) - 1


@dataclass
class Draws:
    """A layer's seed and the number of draws made so far."""

    seed: int
    step: int = 0

    @classmethod
    def fresh(cls) -> "Draws":
        """A state whose seed comes from torch's global generator."""
        return cls(int(torch.randint(0, 2**62, (), dtype=torch.int64)))

    def next_generator(self) -> torch.Generator:
        """A host generator for this step's draw, seeded by (seed, step); advances the step."""
        generator = torch.Generator().manual_seed((self.seed + self.step * _MIX) & _MASK)
        self.step += 1
        return generator

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Draws":
        """The state saved by :meth:`as_dict`; a fresh one when ``data`` is empty."""
        if not data:
            return cls.fresh()
        return cls(int(data["seed"]), int(data["step"]))


class SampledCompressor(Compressor):
    """Base of the methods that draw at every step: their per-layer state is a :class:`Draws`.

    ``truncated_neighbours``: when True, the neighbours' factors (BatchNorm's x_hat) come from
    ``neighbour_method`` (the truncated decomposition of the same form) at the same eps instead
    of a draw. Off by default, by measurement: BatchNorm's backward, dX = (w / sigma)(dY -
    mean(dY) - x_hat mean(dY x_hat)), is quadratic in x_hat, so a drawn x_hat gives a biased,
    heavy-tailed dX, but a truncated one gives a bias every step repeats, and on the demo task
    (BENCHMARKS.md ``quality-neighbours``, 3 seeds) truncated BatchNorm factors lost more at eps
    0.9 (84.6% against 92.3% in ``quality-unbiased``) and 0.93 (95.9% against 96.5%) and the
    same at 0.95 (96.3%)."""

    truncated_neighbours: ClassVar[bool] = False

    def new_state(self) -> Draws:
        """The layer's seed and draw count (a copy of it reproduces the next step's draw)."""
        return Draws.fresh()

    def state_dict(self, state: Draws) -> dict[str, Any]:
        return state.as_dict()

    def load_state_dict(self, data: dict[str, Any]) -> Draws:
        return Draws.from_dict(data)
