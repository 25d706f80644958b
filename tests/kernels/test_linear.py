"""Linear kernel against plain autograd, in float64, for inputs with 0 to 3 leading dims."""

import pytest
import torch
from torch import nn

import actcomp
import copy

from actcomp.linalg.decompose import hosvd, tracked_hosvd, truncated_svd
from conftest import rel_err

SHAPES = [(7,), (9, 7), (4, 6, 7), (3, 4, 5, 7), (40, 7)]


def make_input(shape):
    # Correlated along every mode so that eps < 1 truncates something.
    x = torch.randn(shape, dtype=torch.float64)
    for mode in range(len(shape)):
        x = x.cumsum(mode)
    return x.requires_grad_()


def grads(layer, x):
    layer.zero_grad()
    x.grad = None
    torch.manual_seed(1)
    y = layer(x)
    y.backward(torch.randn_like(y))
    out = [x.grad.clone(), layer.weight.grad.clone()]
    if layer.bias is not None:
        out.append(layer.bias.grad.clone())
    return y.detach(), out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["hosvd", "asi", "svd"])
def test_eps_one_equals_plain_autograd(shape, bias, method):
    layer = nn.Linear(7, 5, bias=bias).double()
    x = make_input(shape)
    y_ref, ref = grads(layer, x)
    actcomp.compress(layer, method=method, eps=1.0)
    y, ours = grads(layer, x)
    assert torch.equal(y, y_ref)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
@pytest.mark.parametrize("method, eps", [("hosvd", 0.6), ("hosvd", 0.95), ("svd", 0.9)])
def test_eps_below_one_equals_autograd_on_reconstruction(shape, method, eps):
    layer = nn.Linear(7, 5).double()
    x = make_input(shape)
    if method == "hosvd":
        x_hat = hosvd(x, eps).reconstruct()
    else:
        x_hat = truncated_svd(x.reshape(-1, 7), eps).reconstruct().reshape(shape)
    assert rel_err(x_hat, x) > 1e-6
    _, on_reconstruction = grads(layer, x_hat.requires_grad_())
    _, exact = grads(layer, x)
    actcomp.compress(layer, method=method, eps=eps)
    _, ours = grads(layer, x)
    assert rel_err(ours[1], on_reconstruction[1]) < 1e-10
    assert rel_err(ours[0], exact[0]) < 1e-10
    assert rel_err(ours[2], exact[2]) < 1e-10


def test_svd_ranks_are_over_rows_of_all_leading_dims():
    layer = nn.Linear(7, 5).double()
    actcomp.compress(layer, method="svd", eps=0.999999)
    x = torch.randn(3, 4, 2, dtype=torch.float64) @ torch.randn(2, 7, dtype=torch.float64)  # rows of rank 2
    layer(x.requires_grad_()).sum().backward()
    stats = actcomp.stats(layer)[""]
    assert stats.ranks == (2,)  # one rank over the 3 * 4 rows
    assert stats.input_shape == (3, 4, 7)


def test_bfloat16_autocast():
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = layer(x)
        actcomp.compress(layer, eps=0.9)
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_asi_tracked_step_equals_autograd_on_reconstruction(shape):
    layer = nn.Linear(7, 5).double()
    actcomp.compress(layer, method="asi", eps=0.8)
    grads(layer, make_input(shape))
    x = (make_input(shape).detach() * 1.01).requires_grad_()
    tracker = actcomp.layer_state(layer).tracker
    x_hat = tracked_hosvd(x, 0.8, copy.deepcopy(tracker)).reconstruct().requires_grad_()
    _, ours = grads(layer, x)
    actcomp.restore(layer)
    _, on_reconstruction = grads(layer, x_hat)
    _, exact = grads(layer, x)
    assert rel_err(ours[1], on_reconstruction[1]) < 1e-10
    assert rel_err(ours[0], exact[0]) < 1e-10 and rel_err(ours[2], exact[2]) < 1e-10
