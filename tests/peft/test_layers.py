"""SVD-parametrised Linear and Conv2d against the plain layers and plain autograd, in float64."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from actcomp.peft import SVDConv2d, SVDLinear, householder_sequential, svd_adapt
from conftest import rel_err

# (name, factory, input shape)
LAYERS = [
    ("linear out<in", lambda: nn.Linear(7, 5), (4, 7)),
    ("linear out>in tokens no bias", lambda: nn.Linear(5, 9, bias=False), (2, 3, 5)),
    ("conv 3x3", lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 6, 6)),
    ("conv grouped strided rect", lambda: nn.Conv2d(4, 6, (3, 2), stride=2, groups=2, bias=False), (2, 4, 7, 6)),
    ("conv depthwise dilated reflect", lambda: nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6, padding_mode="reflect"), (2, 6, 6, 6)),
    ("conv 1x1 out>in", lambda: nn.Conv2d(4, 12, 1), (3, 4, 5, 5)),
]
IDS = [name for name, _, _ in LAYERS]


def make(factory, side="out", reflections=6):
    torch.manual_seed(0)
    plain = factory().double()
    layer = copy.deepcopy(plain)
    svd_adapt(layer, "all", reflections=reflections, train="s+q" if reflections else "s", side=side)
    return plain, layer


def perturb(layer):
    """Move s and the reflection vectors away from their initial values (no longer Q = I)."""
    with torch.no_grad():
        layer.s.mul_(1 + 0.2 * torch.randn_like(layer.s))
        if layer.reflectors is not None:
            layer.reflectors.add_(0.5 * torch.randn_like(layer.reflectors))


def reference_matrix(layer, s, reflectors):
    """W from the definition, with the reflections applied one at a time."""
    u, v = layer.u0, layer.v0
    if reflectors is not None:
        if layer.svd_side == "out":
            u = householder_sequential(reflectors, u)
        else:
            v = householder_sequential(reflectors, v)
    return (u * s) @ v.T


def reference_output(plain, layer, x, s, reflectors):
    weight = reference_matrix(layer, s, reflectors).reshape(plain.weight.shape)
    return functional_call(plain, {"weight": weight, "bias": plain.bias}, (x,))


@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=IDS)
@pytest.mark.parametrize("side", ["out", "in"])
def test_initial_weight_is_the_pretrained_weight(name, factory, shape, side):
    plain, layer = make(factory, side)
    assert rel_err(layer.weight, plain.weight) < 1e-13
    assert layer.weight.shape == plain.weight.shape
    x = torch.randn(shape, dtype=torch.float64)
    assert rel_err(layer(x), plain(x)) < 1e-13


@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=IDS)
@pytest.mark.parametrize("side", ["out", "in"])
def test_forward_and_gradients_equal_autograd_on_the_definition(name, factory, shape, side):
    plain, layer = make(factory, side)
    perturb(layer)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    s = layer.s.detach().clone().requires_grad_()
    q = layer.reflectors.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference_output(plain, layer, x_ref, s, q)
    y_ref.backward(dy)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(layer.s.grad, s.grad) < 1e-10
    assert rel_err(layer.reflectors.grad, q.grad) < 1e-10
    assert rel_err(x.grad, x_ref.grad) < 1e-10
    if plain.bias is not None:
        y_bias = reference_output(plain, layer, x.detach(), s.detach(), q.detach())
        (bias_grad,) = torch.autograd.grad(y_bias, plain.bias, dy)
        assert rel_err(layer.bias.grad, bias_grad) < 1e-10


@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=IDS)
def test_singular_value_gradient_is_u_dw_v(name, factory, shape):
    """With W = U diag(s) V^T, dL/ds_i = u_i^T dW v_i, dW being plain autograd's weight gradient."""
    plain, layer = make(factory, reflections=0)
    x = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    plain(x).backward(dy)
    grad_w = plain.weight.grad.reshape(plain.weight.shape[0], -1)
    expected = ((layer.u0.T @ grad_w) * layer.v0.T).sum(1)
    assert rel_err(layer.s.grad, expected) < 1e-12
    assert layer.reflectors is None


def test_classes_and_layouts():
    _, linear = make(lambda: nn.Linear(7, 5))
    _, conv = make(lambda: nn.Conv2d(4, 6, (3, 2), groups=2))
    assert type(linear) is SVDLinear and isinstance(linear, nn.Linear)
    assert type(conv) is SVDConv2d and isinstance(conv, nn.Conv2d)
    assert conv.weight.shape == (6, 2, 3, 2) and conv.weight_matrix().shape == (6, 12)
    assert conv.u0.shape == (6, 6) and conv.v0.shape == (12, 6) and conv.reflectors.shape == (6, 6)
    _, wide = make(lambda: nn.Linear(7, 5), side="in")
    assert wide.reflectors.shape == (6, 7) and wide.s.shape == (5,)
    assert "svd(k=5, reflections=6, side=in, train=s+q)" in repr(wide)


def test_weight_is_read_only():
    _, layer = make(lambda: nn.Linear(7, 5))
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = nn.Parameter(torch.zeros(5, 7, dtype=torch.float64))


def test_dtype_and_mode_changes():
    _, layer = make(lambda: nn.Conv2d(3, 6, 3))
    layer.float().eval()
    assert layer.s.dtype == layer.u0.dtype == layer.reflectors.dtype == torch.float32
    with torch.no_grad():
        assert layer(torch.randn(1, 3, 5, 5)).shape == (1, 6, 3, 3)
