"""The kernels on a CUDA device: same gradients as plain autograd, one host sync per layer.

Skipped without CUDA (CI has none); run them where a GPU is present.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from conftest import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYERS = {
    "conv2d": lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1),
    "depthwise-reflect": lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
    "conv1d-same": lambda: nn.Conv1d(8, 12, 4, padding="same"),
    "linear-tokens": lambda: nn.Linear(8, 12),
}
SHAPES = {"conv2d": (6, 8, 10, 10), "depthwise-reflect": (6, 8, 10, 10), "conv1d-same": (6, 8, 20), "linear-tokens": (6, 5, 8)}


def grads(layer, x, dy):
    layer.zero_grad()
    x.grad = None
    layer(x).backward(dy)
    return [x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()]


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("method", ["hosvd", "asi", "svd"])
def test_eps_one_equals_plain_autograd_on_cuda(name, method):
    layer = LAYERS[name]().double().cuda()
    x = F.relu(torch.randn(SHAPES[name], dtype=torch.float64, device="cuda")).requires_grad_()
    dy = torch.randn_like(layer(x))
    ref = grads(layer, x, dy)
    actcomp.compress(layer, method=method, eps=1.0)
    for a, b in zip(grads(layer, x, dy), ref):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("method", ["hosvd", "asi", "svd"])
def test_one_host_sync_per_layer(name, method):
    layer = actcomp.compress(LAYERS[name]().cuda(), method=method, eps=0.8)
    x = F.relu(torch.randn(SHAPES[name], device="cuda")).requires_grad_()
    for _ in range(2):  # warm up (lazy initialisation may sync); asi: the next step is tracked
        layer(x).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = layer(x)
            y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_bf16_autocast_and_saved_bytes_on_cuda():
    layer = actcomp.compress(nn.Conv2d(16, 16, 3, padding=1).cuda(), eps=0.8)
    x = F.relu(F.avg_pool2d(torch.randn(8, 16, 18, 18, device="cuda"), 3, 1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with actcomp.count_saved(layer) as saved:
            y = layer(x)
    assert y.dtype == torch.bfloat16
    # Only the factors: the float32 weight is saved as itself (a parameter), not as a bf16 copy.
    assert saved.saved_bytes == actcomp.stats(layer)[""].kept_bytes < x.numel() * 2
    y.float().sum().backward()
    assert torch.isfinite(layer.weight.grad).all()
