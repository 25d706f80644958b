"""Second-order optimizers whose curvature statistics come from the stored factors.

* :class:`SINGD`: ``singd.SINGD`` (structured inverse-free natural gradient, optional extra
  ``actcomp[singd]``) whose activation Kronecker factor is built, on compressed layers, from a
  thin root of the factors inside the layer's backward instead of the kept input.
* :class:`HyLo`: hybrid low-rank natural gradient descent (KID / KIS), with the per-sample
  input matrices of compressed layers kept as factors (B x k + k x D instead of B x D).

Both behave as their stock counterparts on layers that run plain autograd.
"""

from __future__ import annotations

from typing import Any

from actcomp.optim.hylo import HyLo
from actcomp.optim.roots import kfac_root
from actcomp.optim.samples import SampleFactors, factor_samples

# SINGD is left out of __all__ so that a star import works without the optional singd package
__all__ = ["HyLo", "SampleFactors", "factor_samples", "kfac_root"]


def __getattr__(name: str) -> Any:
    if name == "SINGD":  # imported on first use: it needs the optional singd package
        from actcomp.optim.singd import SINGD

        return SINGD
    raise AttributeError(f"module 'actcomp.optim' has no attribute {name!r}")
