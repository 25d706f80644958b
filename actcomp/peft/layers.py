"""SVD-parametrised layers: W = U diag(s) V^T with one side rotated by Householder reflections.

A pretrained weight, seen as a matrix W0 (out x in), is factored once, W0 = U0 diag(s0) V0^T
(thin SVD, k = min(out, in)). The layer then computes its weight in every forward as

    side "out":  W = (Q U0) diag(s) V0^T,   Q = H(v_1) ... H(v_r) acting on R^out
    side "in":   W = U0 diag(s) (Q V0)^T,   Q acting on R^in

with s (k) and the reflection vectors v_i (r, out or in) as its parameters; U0 and V0 are
frozen buffers. Q is applied to U0 (or V0) in blocked WY form (:mod:`actcomp.peft.householder`),
never formed. The vectors start in equal pairs (v_1 = v_2, v_3 = v_4, ...), so Q = I and
W(init) = W0 up to round-off; training moves the pairs apart.

The layer is linear in its input: y = family(x, W, b), with W computed in the forward. So
whatever computes dW (plain autograd, or actcomp's compressed kernels from low-rank factors of
x) hands dW to autograd, which carries it into s and the vectors. Each class runs its forward in
one place, ``self.family_forward(x, self.family_weight(), self.bias)``.

The classes are subclasses of the layers they adapt (``isinstance(m, nn.Linear)`` holds) and
take an existing module over by swapping its class (see :func:`actcomp.peft.svd_adapt`). Their
``weight`` is a read-only property: the current W in the base class's layout, computed on each
read (writes to it are lost; the parameters are ``s`` and ``reflectors``).

* :class:`SVDLinear`: W is the (out, in) weight itself; family ``LINEAR``.
* :class:`SVDConv2d`: W is the weight (out, in/groups, kh, kw) as a matrix over
  in/groups * kh * kw; family ``CONV`` (every stride, padding, padding_mode, dilation, groups).
* ``SVDConv1D`` (Hugging Face ``transformers.pytorch_utils.Conv1D``, weight stored (in, out)):
  W is the transposed weight (out, in); family ``LINEAR``. Created on first use, so that
  importing actcomp does not import transformers.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from actcomp.kernels.base import LayerFamily
from actcomp.kernels.conv import CONV
from actcomp.kernels.linear import LINEAR
from actcomp.peft.householder import householder_apply

SIDES = ("out", "in")


class SVDWeight:
    """Mixin of the SVD-parametrised layers: parameters ``s`` (k) and ``reflectors`` (r, d) or
    None, buffers ``u0`` (out, k) and ``v0`` (in, k), settings ``svd_side`` and ``svd_block_size``.

    A subclass names its ``family`` (the :class:`~actcomp.kernels.LayerFamily` whose compressed
    kernel runs it: ``LINEAR`` or ``CONV``) and implements ``matrix_of`` (the
    base layout's weight as the matrix W), ``base_layout`` (W back in the base layout),
    ``family_weight`` (W in the layout its family's forward takes) and ``family_forward``.
    """

    family: LayerFamily
    svd_base: type[nn.Module]  # the class a merged layer returns to
    s: nn.Parameter
    reflectors: nn.Parameter | None
    u0: Tensor
    v0: Tensor
    svd_side: str
    svd_block_size: int

    @staticmethod
    def matrix_of(module: nn.Module, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def base_layout(self, matrix: Tensor) -> Tensor:
        raise NotImplementedError

    def family_weight(self) -> Tensor:
        raise NotImplementedError

    def family_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def weight_matrix(self) -> Tensor:
        """W = (Q U0) diag(s) V0^T (side "out") or U0 diag(s) (Q V0)^T (side "in"), (out, in).

        Q is applied to the k columns of U0 or V0 in blocked WY form (r d k multiply-adds),
        then one (out x k) @ (k x in) product forms W; differentiable in s and the vectors."""
        u, v = self.u0, self.v0
        if self.reflectors is not None:
            if self.svd_side == "out":
                u = householder_apply(self.reflectors, u, self.svd_block_size)
            else:
                v = householder_apply(self.reflectors, v, self.svd_block_size)
        return (u * self.s) @ v.T

    @property
    def weight(self) -> Tensor:
        """The current W in the base layer's layout (computed on each read; read-only)."""
        return self.base_layout(self.weight_matrix())

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (named as nn.Linear / nn.Conv2d name it)
        return self.family_forward(input, self.family_weight(), self.bias)

    def svd_repr(self) -> str:
        r = 0 if self.reflectors is None else self.reflectors.shape[0]
        trained = "s+q" if self.reflectors is not None and self.reflectors.requires_grad else "s"
        return f"svd(k={self.s.shape[0]}, reflections={r}, side={self.svd_side}, train={trained})"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.svd_repr()}"  # type: ignore[misc]


class SVDLinear(SVDWeight, nn.Linear):
    """nn.Linear with W = U diag(s) V^T, one side rotated by Householder reflections."""

    family = LINEAR
    svd_base = nn.Linear

    @staticmethod
    def matrix_of(module: nn.Module, weight: Tensor) -> Tensor:
        return weight

    def base_layout(self, matrix: Tensor) -> Tensor:
        return matrix

    def family_weight(self) -> Tensor:
        return self.weight_matrix()

    def family_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)


class SVDConv2d(SVDWeight, nn.Conv2d):
    """nn.Conv2d whose weight, as a matrix (out, in/groups * kh * kw), is U diag(s) V^T with one
    side rotated by Householder reflections."""

    family = CONV
    svd_base = nn.Conv2d

    @staticmethod
    def matrix_of(module: nn.Module, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)

    def base_layout(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def family_weight(self) -> Tensor:
        return self.base_layout(self.weight_matrix())

    def family_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)


class _SVDConv1DMixin(SVDWeight):
    """Hugging Face Conv1D (weight stored (in, out), y = x weight + b) with W = weight^T."""

    family = LINEAR

    @staticmethod
    def matrix_of(module: nn.Module, weight: Tensor) -> Tensor:
        return weight.T

    def base_layout(self, matrix: Tensor) -> Tensor:
        return matrix.T

    def family_weight(self) -> Tensor:
        return self.weight_matrix()

    def family_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def forward(self, x: Tensor) -> Tensor:  # Conv1D names its input x: keyword calls bind as they did
        return SVDWeight.forward(self, x)

    def __repr__(self) -> str:  # Conv1D overrides __repr__, so extra_repr alone would not show
        return f"SVDConv1D(nf={self.nf}, nx={self.nx}, {self.svd_repr()})"


_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: SVDLinear, nn.Conv2d: SVDConv2d}


def hf_conv1d_type() -> type[nn.Module] | None:
    """transformers' Conv1D class if transformers is already imported, else None (a model that
    holds a Conv1D has imported it; this never imports transformers itself)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None) if utils is not None else None


def svd_conv1d_class() -> type[nn.Module]:
    """The SVD-parametrised subclass of transformers' Conv1D (created once; imports
    transformers, which must be installed: ``pip install 'actcomp[transformers]'``)."""
    from transformers.pytorch_utils import Conv1D

    cls = _CLASSES.get(Conv1D)
    if cls is None:
        cls = type("SVDConv1D", (_SVDConv1DMixin, Conv1D), {"__module__": __name__, "__qualname__": "SVDConv1D", "svd_base": Conv1D})
        _CLASSES[Conv1D] = cls
        for hook in _NEW_CLASS_HOOKS:
            hook(cls)
    return cls


_NEW_CLASS_HOOKS: list[Callable[[type[nn.Module]], None]] = []


def on_new_class(hook: Callable[[type[nn.Module]], None]) -> None:
    """Call ``hook(cls)`` for every SVD class made from now on (SVDConv1D is made on first use),
    so that a registry learns of it."""
    _NEW_CLASS_HOOKS.append(hook)


def svd_class_for(module_type: type[nn.Module]) -> type[nn.Module] | None:
    """The SVD-parametrised class for exactly ``module_type`` (nn.Linear, nn.Conv2d,
    transformers' Conv1D), or None. Subclasses are not adapted: they may override forward."""
    if module_type in _CLASSES:
        return _CLASSES[module_type]
    if module_type is hf_conv1d_type():
        return svd_conv1d_class()
    return None


def adaptable_type_names() -> tuple[str, ...]:
    """Names of the adaptable layer types, for messages."""
    return ("Conv1D (transformers)", "Conv2d", "Linear")


def svd_classes() -> tuple[type[nn.Module], ...]:
    """The SVD-parametrised classes made so far (SVDConv1D only once used)."""
    return tuple(dict.fromkeys(_CLASSES.values()))


def __getattr__(name: str) -> type[nn.Module]:
    # ``actcomp.peft.layers.SVDConv1D`` on demand: unpickling a saved adapted GPT-2 in a fresh
    # process finds the class here.
    if name == "SVDConv1D":
        return svd_conv1d_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SIDES", "SVDConv2d", "SVDLinear", "SVDWeight", "on_new_class", "svd_class_for", "svd_classes", "svd_conv1d_class"]
