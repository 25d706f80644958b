"""SVD-parametrised fine-tuning with fast Householder products (FastH, NeurIPS 2020).

::

    from actcomp.peft import svd_adapt, merge
    svd_adapt(model, "last:4", reflections=8, train="s+q")   # in place; W(init) = W0
    ...train: only s and the reflection vectors (and biases you leave trainable) learn...
    actcomp.compress(model, "last:4", method="hosvd")       # optional: keep factors of inputs
    merge(model)                                             # plain layers again, for export
"""

from actcomp.peft.adapt import AdaptedLayer, adapted_layers, merge, select_adaptable, svd_adapt
from actcomp.peft.householder import (
    DEFAULT_BLOCK_SIZE,
    householder_apply,
    householder_product,
    householder_sequential,
    wy_blocks,
)
from actcomp.peft.layers import SVDConv2d, SVDLinear, SVDWeight, svd_conv1d_class
from actcomp.peft import compose as _compose  # noqa: F401  (registers the layers' compressed kernels)

__all__ = [
    "AdaptedLayer",
    "DEFAULT_BLOCK_SIZE",
    "SVDConv2d",
    "SVDLinear",
    "SVDWeight",
    "adapted_layers",
    "householder_apply",
    "householder_product",
    "householder_sequential",
    "merge",
    "select_adaptable",
    "svd_adapt",
    "svd_conv1d_class",
    "wy_blocks",
]


def __getattr__(name: str):
    if name == "SVDConv1D":  # made on first use (imports transformers)
        return svd_conv1d_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
