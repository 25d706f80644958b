"""Empty batches run through every layer type and method (nothing kept, dW zero), and a
compressed layer's output may be modified in place whatever the rank of its input."""

import copy

import pytest
import torch
from torch import nn

import actcomp
from conftest import rel_err

METHODS = ["hosvd", "asi", "svd", "gradient_filter", "none"]

# id -> (module factory, shape of a non-empty input; the empty one has batch 0)
LAYERS = {
    "linear-2d": (lambda: nn.Linear(6, 4), (5, 6)),
    "linear-tokens": (lambda: nn.Linear(6, 4), (3, 5, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    "conv3d-strided": (lambda: nn.Conv3d(2, 4, 3, stride=2, padding=1), (2, 2, 8, 8, 8)),
}


def hf_conv1d():
    return pytest.importorskip("transformers.pytorch_utils").Conv1D(4, 6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", [*LAYERS, "hf-conv1d"])
def test_empty_batch_keeps_nothing_and_gives_zero_weight_gradients(name, method):
    factory, shape = LAYERS.get(name, (hf_conv1d, (3, 5, 6)))
    torch.manual_seed(0)
    layer = factory().double()
    reference = copy.deepcopy(layer)
    actcomp.compress(layer, method=method, eps=0.8)
    empty = torch.randn(0, *shape[1:], dtype=torch.float64, requires_grad=True)
    with actcomp.count_saved(layer) as saved:
        y = layer(empty)
    assert y.shape == reference(empty).shape and saved.saved_bytes == 0
    y.sum().backward()
    assert empty.grad.shape == empty.shape
    assert torch.count_nonzero(layer.weight.grad) == 0 and torch.count_nonzero(layer.bias.grad) == 0
    assert actcomp.stats(layer)[""].kept_bytes == 0
    # the next, non-empty batch runs as usual (asi's carried state untouched by the empty one)
    layer.zero_grad()
    x = torch.randn(shape, dtype=torch.float64)
    layer(x).sum().backward()
    assert actcomp.layer_state(layer).runs == 2 and torch.count_nonzero(layer.weight.grad) > 0


def linear_input(shape, contiguous):
    x = torch.randn(*shape[:-1], shape[-1] * 2, dtype=torch.float64)
    x = x[..., ::2] if not contiguous else x[..., : shape[-1]].contiguous()
    return x.requires_grad_()


@pytest.mark.parametrize("inplace", ["relu_", "add_", "mul_"])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6,), (5, 6), (3, 5, 6), (2, 3, 5, 6)], ids=["1d", "2d", "3d", "4d"])
def test_inplace_op_after_compressed_linear(shape, bias, contiguous, inplace):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=bias).double()
    reference = copy.deepcopy(layer)
    x = linear_input(shape, contiguous)

    def step(module):
        x.grad = None
        y = module(x)
        getattr(y, inplace)(*(() if inplace == "relu_" else (2.0,)))
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), module.weight.grad.clone()

    expected = step(reference)
    actcomp.compress(layer, eps=1.0)
    ours = step(layer)
    assert actcomp.layer_state(layer).runs == 1
    assert torch.equal(ours[0], expected[0])
    assert rel_err(ours[1], expected[1]) < 1e-12 and rel_err(ours[2], expected[2]) < 1e-10


@pytest.mark.parametrize("shape", [(6,), (5, 6), (3, 5, 6)], ids=["1d", "2d", "3d"])
def test_inplace_op_after_compressed_hf_conv1d(shape):
    layer = hf_conv1d().double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    actcomp.compress(layer, eps=1.0)
    y = layer(x)
    y += 1.0
    y.relu_().sum().backward()
    assert actcomp.layer_state(layer).runs == 1 and x.grad.shape == x.shape
