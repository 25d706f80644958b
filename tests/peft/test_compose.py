"""compress() on SVD-parametrised layers: they keep factors of their inputs, and the gradients
of s and of the reflection vectors are autograd's on the reconstructed input (float64)."""

import copy

import pytest
import torch
from torch import nn

import actcomp
from actcomp.linalg.decompose import hosvd, truncated_svd
from actcomp.peft import merge, svd_adapt
from conftest import rel_err

LAYERS = [
    ("linear tokens", lambda: nn.Linear(9, 6), (4, 5, 9)),
    ("linear out>in", lambda: nn.Linear(6, 10), (12, 6)),
    ("conv 3x3", lambda: nn.Conv2d(4, 6, 3, padding=1), (5, 4, 6, 6)),
    ("conv grouped strided reflect", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect"), (5, 4, 7, 7)),
]
IDS = [name for name, _, _ in LAYERS]


def make_input(shape):
    x = torch.randn(shape, dtype=torch.float64)
    for mode in range(len(shape)):  # correlated along every mode, so that eps < 1 truncates
        x = x.cumsum(mode)
    return x


def adapted(factory, side):
    torch.manual_seed(0)
    layer = svd_adapt(factory().double(), "all", reflections=6, side=side)
    with torch.no_grad():  # away from the initial Q = I
        layer.s.mul_(1 + 0.2 * torch.randn_like(layer.s))
        layer.reflectors.add_(0.5 * torch.randn_like(layer.reflectors))
    return layer


def grads(layer, x, dy):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    layer(x).backward(dy)
    return [x.grad, layer.s.grad.clone(), layer.reflectors.grad.clone(), layer.bias.grad.clone()]


def reconstruction(x, method, eps):
    if method == "hosvd":
        return hosvd(x, eps).reconstruct()
    if method == "asi":  # its first step: every mode by Gram + eigh, from a fresh tracker
        from actcomp.linalg.decompose import SubspaceTracker, tracked_hosvd

        return tracked_hosvd(x, eps, SubspaceTracker()).reconstruct()
    if x.ndim == 4:  # conv: batch-mode unfolding
        return truncated_svd(x, eps).reconstruct()
    return truncated_svd(x.reshape(-1, x.shape[-1]), eps).reconstruct().reshape(x.shape)


@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=IDS)
@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("method, eps", [("hosvd", 0.9), ("svd", 0.9), ("asi", 0.95)])
def test_gradients_equal_autograd_on_the_reconstructed_input(name, factory, shape, side, method, eps):
    layer = adapted(factory, side)
    x = make_input(shape)
    dy = torch.randn_like(layer(x))
    x_hat = reconstruction(x, method, eps)
    assert rel_err(x_hat, x) > 1e-6  # something was truncated
    on_reconstruction = grads(layer, x_hat, dy)
    exact = grads(layer, x, dy)
    actcomp.compress(layer, method=method, eps=eps)
    ours = grads(layer, x, dy)
    assert rel_err(ours[1], on_reconstruction[1]) < 1e-10  # s
    assert rel_err(ours[2], on_reconstruction[2]) < 1e-10  # reflection vectors
    assert rel_err(ours[0], exact[0]) < 1e-10  # dX exact from W
    assert rel_err(ours[3], exact[3]) < 1e-10  # db exact
    assert rel_err(ours[1], exact[1]) > 1e-8  # and the factors did change dW


@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=IDS)
def test_eps_one_equals_plain_autograd(name, factory, shape):
    layer = adapted(factory, "out")
    x = make_input(shape)
    dy = torch.randn_like(layer(x))
    exact = grads(layer, x, dy)
    actcomp.compress(layer, method="hosvd", eps=1.0)
    for ours, ref in zip(grads(layer, x, dy), exact):
        assert rel_err(ours, ref) < 1e-10


@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=IDS)
@pytest.mark.parametrize("method", ["hosvd", "svd"])
def test_layer_keeps_factors_not_its_input(name, factory, shape, method):
    """What autograd keeps = the factors + the weight side (W, and what computing W from s and
    the vectors keeps: independent of the batch); the input itself is not kept."""
    layer = adapted(factory, "out")
    x = make_input(shape).requires_grad_()  # a middle layer: dX is needed too
    with actcomp.count_saved(layer) as plain:
        layer(x)
    with actcomp.count_saved(layer) as weight_side:
        weight = layer.weight_matrix()
    actcomp.compress(layer, method=method, eps=0.9)
    with actcomp.count_saved(layer) as compressed:
        layer(x)
    stats = actcomp.stats(layer)[""]
    assert stats.kept_bytes < stats.input_bytes == x.nbytes
    assert compressed.saved_bytes == stats.kept_bytes + weight_side.saved_bytes + weight.nbytes
    # plain autograd keeps at least the input (a reflect-padded conv also keeps the padded one)
    assert plain.saved_bytes >= x.nbytes + weight_side.saved_bytes + weight.nbytes
    assert ("cpu", x.untyped_storage().data_ptr()) not in compressed.storages


def test_compressed_adapted_model_trains_restores_and_merges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    model.requires_grad_(False)
    svd_adapt(model, ["2", "4"], reflections=4)
    actcomp.compress(model, ["2", "4"], method="hosvd", eps=0.8)
    assert set(actcomp.compressed_layers(model)) == {"2", "4"}
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = copy.deepcopy(model[4].s.detach())
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert not torch.equal(model[4].s, before)
    stats = actcomp.stats(model)
    assert all(s.kept_bytes < s.input_bytes for s in stats.values())
    assert {s.layer_type for s in stats.values()} == {"SVDConv2d", "SVDLinear"}
    with pytest.raises(ValueError, match="restore"):
        merge(model)
    model.eval()
    out = model(x)
    actcomp.restore(model)
    merge(model)
    assert type(model[2]) is nn.Conv2d and type(model[4]) is nn.Linear
    assert rel_err(model(x), out) < 1e-6


def test_adapted_layers_are_compressible_types():
    assert {"SVDConv2d", "SVDLinear"} <= set(actcomp.supported_types())


def test_adapted_classes_name_the_family_the_registry_runs_them_with():
    """The SVD classes name their LayerFamily object itself; the registry runs each with it."""
    from actcomp.kernels import registration_for
    from actcomp.kernels.conv import CONV
    from actcomp.kernels.linear import LINEAR
    from actcomp.peft.layers import SVDConv2d, SVDLinear

    assert SVDLinear.family is LINEAR and SVDConv2d.family is CONV
    for cls in (SVDLinear, SVDConv2d):
        assert registration_for(cls).family is cls.family
