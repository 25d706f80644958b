"""Composability with actcomp.compress: the SVD-parametrised layers run through the compressed
kernel of their layer family, so they keep low-rank factors of their inputs, not the inputs.

The layers are linear in x: y = family(x, W, b) with W = W(s, reflectors) computed in the
forward. The family's compressed kernel (actcomp.kernels.linear / .conv) receives that W as
its weight input, keeps factors of x, and returns dW from the factors (k pseudo-samples);
autograd then carries dW through W(s, reflectors) into s and the reflection vectors. dX and db
are exact, as for the plain layers.

Each layer type is registered with the kernel registry under a kernel that hands the family
kernel a view of the module whose ``weight`` is ``module.family_weight()`` (computed once per
forward) and whose ``bias`` is the module's; every other attribute (a conv's stride, padding,
...) is the module's own. That view is the "getter of (weight, bias) in the family's layout".
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from actcomp.kernels import register_kernel
from actcomp.kernels.common import LayerState
from actcomp.kernels.conv import conv_kernel
from actcomp.kernels.linear import linear_kernel
from actcomp.peft import layers

_FAMILY_KERNELS = {"linear": linear_kernel, "conv": conv_kernel}


class FamilyView:
    """An SVD-parametrised module as its family's kernel sees it: ``weight`` in the family's
    layout and ``bias`` fixed at creation, everything else read from the module."""

    def __init__(self, module: layers.SVDWeight) -> None:
        self._module = module
        self.weight: Tensor = module.family_weight()
        self.bias: Tensor | None = module.bias  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def family_kernel(module_type: type[nn.Module]) -> Callable[[nn.Module, Tensor, LayerState], Tensor]:
    """The compressed kernel of ``module_type``'s family, run on the module's :class:`FamilyView`."""
    family = _FAMILY_KERNELS[module_type.family]  # type: ignore[attr-defined]

    def kernel(module: nn.Module, x: Tensor, layer: LayerState) -> Tensor:
        return family(FamilyView(module), x, layer)  # type: ignore[arg-type]

    kernel.__name__ = f"{module_type.__name__}_kernel"
    return kernel


def register(module_type: type[nn.Module]) -> None:
    register_kernel(module_type)(family_kernel(module_type))


for _cls in layers.svd_classes():
    register(_cls)
layers._NEW_CLASS_HOOKS.append(register)
