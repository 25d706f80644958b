"""Composability with actcomp.compress: the SVD-parametrised layers run through the compressed
kernel of their layer family, so they keep low-rank factors of their inputs, not the inputs.

The layers are linear in x: y = family(x, W, b) with W = W(s, reflectors) computed in the
forward. Each layer type is registered with :func:`actcomp.kernels.register_layer` under the
:class:`~actcomp.kernels.LayerFamily` the class names (``SVDLinear.family`` is ``LINEAR``,
``SVDConv2d.family`` is ``CONV``) with the getter ``(module.family_weight(), module.bias)``: the
family's compressed kernel receives that W as its weight input, keeps factors of x, and returns
dW from the factors (k pseudo-samples); autograd then carries dW through W(s, reflectors) into s
and the reflection vectors. dX and db are exact, as for the plain layers.
"""

from __future__ import annotations

from torch import Tensor, nn

from actcomp.kernels.base import register_layer
import actcomp.peft.layers as layers


def family_params(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W in the family's layout, computed from s and the vectors; the bias)."""
    return module.family_weight(), module.bias  # type: ignore[attr-defined,return-value]


def register(module_type: type[nn.Module]) -> None:
    """Run ``module_type`` (an SVD-parametrised class) with its family's compressed kernel."""
    register_layer(module_type, family=module_type.family, params=family_params)  # type: ignore[attr-defined]


for _cls in layers.svd_classes():
    register(_cls)
layers.on_new_class(register)
