"""Smooth activations: exact by default (left alone), a k-bit derivative when asked."""

import math

import pytest
import torch
from torch import nn

import actcomp
from actcomp.policies.smooth import codebook

SMOOTH = [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish(), nn.Sigmoid(), nn.Tanh()]


def model_with(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), act, nn.Linear(32, 3))


def test_exact_by_default():
    model = model_with(nn.SiLU())
    actcomp.compress(model, eps=0.9)
    assert type(model[1]) is nn.SiLU  # plain autograd keeps what it needs


@pytest.mark.parametrize("act", SMOOTH, ids=lambda a: repr(a))
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_k_bit_derivative_is_the_codebook_step_function(act, bits):
    model = model_with(act)
    actcomp.compress(model, eps=1.0, neighbours=actcomp.Neighbours(activations=f"bits{bits}"))
    x = torch.randn(40, 6)
    hidden = model[0](x).detach().requires_grad_()
    with actcomp.count_saved() as saved:
        y = model[1](hidden)
    base = actcomp.kernels.base_type(act)
    assert base is not type(act)  # swapped
    assert torch.equal(y, base.forward(act, hidden))  # the forward is unchanged
    assert saved.saved_bytes == math.ceil(hidden.numel() * bits / 8)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, hidden, dy)
    kind = {"GELU": "gelu_tanh" if getattr(act, "approximate", "") == "tanh" else "gelu"}.get(base.__name__, base.__name__.lower())
    breakpoints, levels = codebook(kind, bits)
    expected = dy * levels.float()[torch.bucketize(hidden.detach(), breakpoints.float())]
    assert torch.allclose(dx, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU()], ids=["silu", "gelu"])
def test_more_bits_less_error(act):
    x = torch.randn(20000, dtype=torch.float64, requires_grad=True)
    (exact,) = torch.autograd.grad(type(act).forward(act, x).sum(), x)
    errors = []
    for bits in (1, 2, 4, 8):
        state = actcomp.policies.NeighbourState(name="1", layer_type=type(act).__name__, config=actcomp.CompressionConfig(), neighbours=actcomp.Neighbours(activations=f"bits{bits}"), approximate=True)
        from actcomp.policies.smooth import quantized

        (approx,) = torch.autograd.grad(quantized(act, x, state).sum(), x)
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.02 and errors[2] < 0.1
