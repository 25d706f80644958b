"""timm's ``timm.layers.linear.Linear``: a subclass of ``nn.Linear`` whose forward (overridden
for TorchScript's dtype casts) computes ``F.linear(x, W, b)``, what ``nn.Linear`` computes, so
it runs with the linear family (mobilenetv3's and efficientnet's classifiers). Registered by
qualified name: actcomp never imports timm.
"""

from __future__ import annotations

from actcomp.kernels.base import register_layer
from actcomp.kernels.linear import LINEAR

TIMM_LINEAR = "timm.layers.linear.Linear"

register_layer(TIMM_LINEAR, family=LINEAR)
