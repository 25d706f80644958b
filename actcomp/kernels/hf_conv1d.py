"""Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ...): a linear map whose
weight is stored transposed, (in, out), computing ``y = b + x W`` with ``torch.addmm``.

It is the linear family with the weight getter ``(W^T, b)``: the kernel computes
``addmm(b, x, (W^T)^T)``, bit for bit what the layer computes, keeps the factors of x, and
returns dW^T for the transposed view, which autograd carries back to the parameter as dW.
Registered by qualified name, so actcomp never imports ``transformers``; the type is matched
when a model uses it.
"""

from __future__ import annotations

from torch import Tensor, nn

from actcomp.kernels.base import register_layer
from actcomp.kernels.linear import LINEAR

HF_CONV1D = "transformers.pytorch_utils.Conv1D"


def transposed_params(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W^T, b) of a layer storing its weight as (in, out): the linear family's (out, in)."""
    return module.weight.t(), module.bias


register_layer(HF_CONV1D, family=LINEAR, params=transposed_params)
