"""hosvd_unbiased and svd_unbiased: weight gradients whose mean over steps is plain autograd's
(float64, statistical tests with a tolerance that a biased method fails), draws reproducible
from the carried state, exact at eps 1."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.methods.draws import Draws
from conftest import rel_err


def smooth(*shape):
    x = torch.randn(*shape, dtype=torch.float64)
    for mode in range(1, len(shape)):
        x = x.cumsum(mode) / shape[mode] ** 0.5
    return F.relu(x + 0.3)


LAYERS = {
    "conv": (lambda: nn.Conv2d(6, 5, 3, padding=1), (12, 6, 7, 7)),
    "linear": (lambda: nn.Linear(20, 7), (24, 20)),
}


def weight_grads(layer, x, dy, steps):
    grads = []
    for _ in range(steps):
        layer.zero_grad()
        layer(x).backward(dy)
        grads.append(layer.weight.grad.clone())
    return torch.stack(grads)


@pytest.mark.parametrize("method", ["hosvd_unbiased", "svd_unbiased"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_mean_weight_gradient_converges_to_plain(method, kind):
    factory, shape = LAYERS[kind]
    layer = factory().double()
    x = smooth(*shape)
    y = layer(x)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    exact = weight_grads(layer, x, dy, 1)[0]
    truncated = copy.deepcopy(layer)
    actcomp.compress(truncated, config=actcomp.CompressionConfig(method.removesuffix("_unbiased"), 0.6))
    bias = float(((weight_grads(truncated, x, dy, 1)[0] - exact) ** 2).sum())
    actcomp.compress(layer, config=actcomp.CompressionConfig(method, 0.6))
    grads = weight_grads(layer, x, dy, 400)
    errors = grads - exact
    mean = errors.mean(0)
    expected = float(((errors - mean) ** 2).sum()) / (len(grads) - 1) / len(grads)  # tr(Cov) / draws
    squared = float((mean**2).sum())
    assert 0 < expected and squared < 3 * expected, (squared, expected)
    assert squared < bias / 4  # closer than truncation at the same eps, whose error stays
    assert rel_err(grads[0], exact) > 1e-3  # one step is an estimate, not the exact gradient


@pytest.mark.parametrize("method", ["hosvd_unbiased", "svd_unbiased"])
def test_eps_one_is_plain(method):
    layer = nn.Conv2d(4, 3, 3).double()
    x = smooth(5, 4, 6, 6).requires_grad_()
    reference = copy.deepcopy(layer)
    reference(x).square().sum().backward()
    expected = (x.grad.clone(), reference.weight.grad.clone(), reference.bias.grad.clone())
    x.grad = None
    actcomp.compress(layer, config=actcomp.CompressionConfig(method, 1.0))
    layer(x).square().sum().backward()
    for ours, theirs in zip((x.grad, layer.weight.grad, layer.bias.grad), expected):
        assert rel_err(ours, theirs) < 1e-10


def test_a_copy_of_the_state_reproduces_the_draw_and_the_state_saves():
    torch.manual_seed(3)
    layer = nn.Conv2d(6, 5, 3).double()
    actcomp.compress(layer, config=actcomp.CompressionConfig("hosvd_unbiased", 0.6))
    state = actcomp.layer_state(layer)
    x = smooth(8, 6, 6, 6)
    layout = actcomp.InputLayout(sample_modes=1, stride=(1, 1))
    before = copy.deepcopy(state.method_state)
    first = state.compressor.compress(x, layout, state.method_state)
    again = state.compressor.compress(x, layout, before)
    assert all(torch.equal(a, b) for a, b in zip(first.tensors(), again.tensors()))
    second = state.compressor.compress(x, layout, state.method_state)  # the next step draws anew
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first.tensors(), second.tensors()))
    saved = state.compressor.state_dict(state.method_state)
    loaded = state.compressor.load_state_dict(saved)
    assert isinstance(loaded, Draws) and loaded == state.method_state


def test_seed_follows_torch_manual_seed():
    torch.manual_seed(11)
    a = Draws.fresh()
    torch.manual_seed(11)
    b = Draws.fresh()
    assert a == b
    assert a.next_generator().initial_seed() != a.next_generator().initial_seed()


@pytest.mark.parametrize("method", ["hosvd_unbiased", "svd_unbiased"])
def test_batchnorm_draws_too_by_default(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()).double()
    actcomp.compress(model, config=actcomp.CompressionConfig(method, 0.7))
    assert actcomp.layer_state(model[1]).config == actcomp.CompressionConfig(method, 0.7)


@pytest.mark.parametrize("method", ["hosvd_unbiased", "svd_unbiased"])
def test_with_truncated_neighbours_batchnorm_gets_the_twins_factors_and_only_the_layers_draw(method, monkeypatch):
    """With ``truncated_neighbours`` BatchNorm's factors are the truncated twin method's, not
    drawn: dX through it and its own gradients equal those of the model compressed with the
    twin, at every step, while the layers' dW are drawn."""
    monkeypatch.setattr(actcomp.methods.method_class(method), "truncated_neighbours", True)
    twin = method.removesuffix("_unbiased")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1)).double()
    truncated = copy.deepcopy(model)
    actcomp.compress(model, config=actcomp.CompressionConfig(method, 0.7))
    actcomp.compress(truncated, config=actcomp.CompressionConfig(twin, 0.7))
    assert actcomp.layer_state(model[1]).config == actcomp.CompressionConfig(twin, 0.7)
    x = smooth(10, 3, 8, 8)
    dy = torch.randn(10, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    conv_grads = []
    for _ in range(2):  # two steps: two draws for the layers, the same truncation for BatchNorm
        grads = []
        for m in (model, truncated):
            m.zero_grad()
            xi = x.clone().requires_grad_()
            m(xi).backward(dy)
            grads.append((xi.grad, m[1].weight.grad, m[1].bias.grad, m[0].weight.grad, m[3].weight.grad))
        (gx, gw, gb, g0, g3), (gx_t, gw_t, gb_t, g0_t, g3_t) = grads
        assert actcomp.layer_state(model[1]).stats().ranks == actcomp.layer_state(truncated[1]).stats().ranks
        for ours, theirs in ((gx, gx_t), (gw, gw_t), (gb, gb_t)):
            assert rel_err(ours, theirs) < 1e-10
        assert rel_err(g3, g3_t) > 1e-6  # the last conv's input is drawn, not truncated
        conv_grads.append(g3)
    assert rel_err(conv_grads[0], conv_grads[1]) > 1e-6  # a new draw each step
