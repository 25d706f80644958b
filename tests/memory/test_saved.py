"""What autograd keeps, counted through saved_tensors_hooks, once per storage."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.linalg.decompose import hosvd, truncated_svd


def smooth_input(*shape):
    return F.relu(F.avg_pool2d(torch.randn(*shape[:2], shape[2] + 2, shape[3] + 2), 3, 1)).requires_grad_()


@pytest.mark.parametrize("method", ["hosvd", "svd"])
@pytest.mark.parametrize("eps", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("groups", [1, 8])
def test_compressed_conv_keeps_exactly_its_factors(method, eps, groups):
    layer = nn.Conv2d(8, 16, 3, padding=1, groups=groups)
    x = smooth_input(16, 8, 12, 12)
    actcomp.compress(layer, method=method, eps=eps)
    with actcomp.count_saved(layer) as saved:
        y = layer(x)
    factors = hosvd(x, eps) if method == "hosvd" else truncated_svd(x, eps)
    assert saved.parameter_bytes == layer.weight.numel() * 4  # the weight, for dX
    if factors.nbytes > x.numel() * x.element_size():  # never worse than plain: x itself
        assert saved.saved_bytes == x.numel() * x.element_size() == actcomp.stats(layer)[""].kept_bytes
        assert actcomp.stats(layer)[""].method == "plain" and eps == 1.0
    else:
        assert saved.saved_bytes == factors.nbytes == actcomp.stats(layer)[""].kept_bytes
        assert (str(x.device), x.untyped_storage().data_ptr()) not in saved.storages  # not x itself
        assert tuple(x.shape) not in [shape for shape, _ in saved.shapes]  # nor anything of x's size
    y.sum().backward()  # the saved factors suffice for backward


@pytest.mark.parametrize("shape", [(32, 20), (4, 10, 20)])
def test_compressed_linear_keeps_exactly_its_factors(shape):
    layer = nn.Linear(20, 6)
    x = torch.randn(shape).cumsum(0).requires_grad_()
    actcomp.compress(layer, eps=0.8)
    with actcomp.count_saved(layer) as saved:
        layer(x)
    assert saved.saved_bytes == hosvd(x, 0.8).nbytes


def test_plain_conv_keeps_its_input():
    layer = nn.Conv2d(8, 16, 3, padding=1)
    x = smooth_input(4, 8, 12, 12)
    with actcomp.count_saved(layer) as saved:
        layer(x)
    assert saved.saved_bytes == x.numel() * 4


def test_model_counts_what_other_layers_keep_too():
    """ReLU keeps its output, which is the compressed conv's input: compressing the conv
    alone (neighbours=None) does not free it, and the count must show that; with the
    neighbours handled (the default) the ReLU keeps a 1-bit mask instead."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(4, 3, 10, 10)
    with actcomp.count_saved(model) as plain:
        model(x)
    x_bytes, relu_out = 4 * 3 * 10 * 10 * 4, 4 * 8 * 10 * 10 * 4
    # conv0 keeps x for dW; ReLU keeps its output, which conv2 keeps too (one storage).
    assert plain.saved_bytes == x_bytes + relu_out
    actcomp.compress(model, layers=["2"], eps=0.5, neighbours=None)
    with actcomp.count_saved(model) as compressed:
        model(x)
    assert compressed.saved_bytes == x_bytes + relu_out + actcomp.stats(model)["2"].kept_bytes
    actcomp.compress(model, layers=["2"], eps=0.5)
    with actcomp.count_saved(model) as handled:
        model(x)
    assert handled.saved_bytes == x_bytes + relu_out // 32 + actcomp.stats(model)["2"].kept_bytes


def test_views_of_one_storage_count_once():
    x = torch.randn(10, 10, requires_grad=True)
    with actcomp.count_saved() as saved:
        base = x * 1
        a, b = base[:5], base[5:]
        (a.exp() * 1).sum()
        (b.exp() * 1).sum()
        torch.mm(base, base)  # saves base twice (self, mat2)
    exps = 2 * 5 * 10 * 4
    assert saved.saved_bytes == exps + 10 * 10 * 4
