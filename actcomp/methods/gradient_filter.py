"""Method ``"gradient_filter"``: the paper's baseline, Gradient Filter (Yang et al., CVPR 2023).

With patch size r, the output gradient is replaced by its means over r x r patches (piecewise
constant), and a convolution keeps its input averaged over the input region of each patch
(r * stride per side): memory / (r * stride)^2. Backward: dX is the transposed convolution of the
filtered gradient (exact for it); dW[o, c, taps] = r^2 sum_{b,p} gbar[b,o,p] xbar[b,c,p] on every
tap (the filter's assumption that the input is constant within a patch); db = sum dY.
Layers without spatial modes (Linear) stay exact: plain autograd. ``eps`` is unused; the
setting is ``patch`` (declared in ``own_settings``: ``CompressionConfig("gradient_filter", patch=2)``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from actcomp.linalg.decompose import NonFiniteActivationError
from actcomp.linalg.factors import PatchMeans
from actcomp.methods.base import Compressor, InputLayout, Setting, register_method

_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def patch_means(t: Tensor, size: tuple[int, ...]) -> Tensor:
    """Means of t (B, C, *spatial) over non-overlapping patches of ``size`` (the last patch of
    a side may be partial and is averaged over what it covers)."""
    return _AVG_POOL[len(size)](t, size, size, ceil_mode=True)


def check_patch(patch: object) -> int:
    """``patch`` if it is a whole number >= 1 (the filter's r), else ValueError."""
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be a whole number >= 1 (the gradient filter's r), got {patch!r}")
    return patch


@register_method
class GradientFilter(Compressor):
    """Patch-averaged input and output gradient; Linear layers exact."""

    name = "gradient_filter"
    settings = ("patch",)
    own_settings = (Setting("patch", 4, check_patch, "gradient_filter patch size r"),)
    knob = None
    exact_at_one = False
    reconstructs = False

    def setting(self) -> str:
        return f"r={self.config.patch}"

    def runs_plain(self, layout: InputLayout) -> bool:
        return layout.spatial == 0

    def compress(self, x: Tensor, layout: InputLayout, state: Any) -> PatchMeans:
        region = tuple(self.config.patch * s for s in layout.stride)
        with torch.no_grad():
            means = patch_means(x.detach(), region).contiguous()
        if not bool(torch.isfinite(means).all()):
            raise NonFiniteActivationError("the activation holds NaN or Inf values")
        return PatchMeans(means, region)

    def filter_grad(self, grad_out: Tensor, layout: InputLayout) -> Tensor:
        patch = self.config.patch
        filtered = patch_means(grad_out, (patch,) * layout.spatial)
        for d in range(layout.spatial):
            filtered = filtered.repeat_interleave(patch, dim=2 + d)
        crop = (slice(None), slice(None), *(slice(0, n) for n in grad_out.shape[2:]))
        return filtered[crop].contiguous()
