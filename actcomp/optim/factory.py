"""One definition of the optimizers the application builds by name (``--optimizer``, the
optimizer comparison): :func:`make_optimizer`."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

#: The names :func:`make_optimizer` knows, in the order the command line lists them.
OPTIMIZER_NAMES = ("sgd", "momentum", "adam", "singd", "hylo")

#: Those that build their curvature from the model's layers (they need the model itself).
MODEL_OPTIMIZERS = ("singd", "hylo")


def make_optimizer(
    name: str, params_or_model: nn.Module | Iterable[nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    """The optimizer ``name`` at learning rate ``lr``, with exactly these settings:

    * ``"sgd"``: ``torch.optim.SGD``, momentum 0 (plain SGD), no weight decay;
    * ``"momentum"``: ``torch.optim.SGD`` with momentum 0.9 (no dampening, not Nesterov);
    * ``"adam"``: ``torch.optim.Adam`` with torch's defaults (betas (0.9, 0.999), eps 1e-8);
    * ``"singd"``: :class:`actcomp.optim.SINGD` with dense structures, T=5 (curvature
      refreshed every 5 steps), the rest singd's defaults, no warning for unsupported layers
      (needs the optional ``singd`` package);
    * ``"hylo"``: :class:`actcomp.optim.HyLo` (hybrid), refresh every 5 steps, rank ratio
      r = n/4, damping 0.1, momentum 0.9.

    ``params_or_model``: a model, whose parameters that require grad are optimized (in
    ``parameters()`` order), or the parameters themselves (then only sgd, momentum and adam:
    singd and hylo need the model). Raises ValueError listing the names for any other name.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; one of {', '.join(OPTIMIZER_NAMES)}")
    if name in MODEL_OPTIMIZERS:
        if not isinstance(params_or_model, nn.Module):
            raise ValueError(f"optimizer {name!r} builds its curvature from the layers: give the model, not its parameters")
        if name == "singd":
            from actcomp.optim import SINGD

            return SINGD(params_or_model, lr=lr, T=5, warn_unsupported=False)
        from actcomp.optim import HyLo

        return HyLo(params_or_model, lr=lr, momentum=0.9, damping=0.1, update_freq=5, rank_ratio=0.25)
    if isinstance(params_or_model, nn.Module):
        params = [p for p in params_or_model.parameters() if p.requires_grad]
    else:
        params = list(params_or_model)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "momentum" else 0.0)
