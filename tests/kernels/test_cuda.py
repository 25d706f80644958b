"""The kernels on a CUDA device: same gradients as plain autograd, host syncs per layer as
documented (hosvd: one per mode; asi, svd: one), and no sync at all in actcomp.linalg.syncfree's
steady state.

Skipped without CUDA (CI has none); run them where a GPU is present.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.linalg.syncfree import SyncFreeState, syncfree_hosvd, syncfree_step
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
@pytest.mark.parametrize("method", ["hosvd", "asi", "svd", "syncfree"])
def test_eps_one_equals_plain_autograd_on_cuda(name, method):
    layer = LAYERS[name]().double().cuda()
    x = F.relu(torch.randn(SHAPES[name], dtype=torch.float64, device="cuda")).requires_grad_()
    dy = torch.randn_like(layer(x))
    ref = grads(layer, x, dy)
    actcomp.compress(layer, method=method, eps=1.0)
    for _ in range(2):  # asi, syncfree: the second step runs on carried state
        for a, b in zip(grads(layer, x, dy), ref):
            assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("method", ["hosvd", "asi", "svd"])
def test_host_syncs_per_layer(name, method):
    """hosvd reads each mode's rank on the host (sequential truncation: one sync per mode of the
    input); asi and svd read everything in one copy."""
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
    assert len(syncs) == (x.ndim if method == "hosvd" else 1), [str(w.message) for w in syncs]


SYNCFREE = {
    "conv2d": (lambda: nn.Conv2d(8, 12, 3, padding=1), (16, 8, 12, 12)),
    "depthwise": (lambda: nn.Conv2d(24, 24, 3, padding=1, groups=24), (16, 24, 14, 14)),
    "conv1d": (lambda: nn.Conv1d(8, 12, 3, padding=1), (16, 8, 30)),
    "linear-tokens": (lambda: nn.Linear(8, 12), (16, 5, 8)),
}


@pytest.mark.parametrize("name", list(SYNCFREE))
def test_syncfree_training_steps_never_sync(name):
    """Method 'syncfree': after the initialising step and two warm-up steps, whole training
    steps of the layer (forward, factors, dX, dW from the factors, db) on fresh batches run
    with sync debug mode 'error': any host sync raises."""
    factory, shape = SYNCFREE[name]
    layer = actcomp.compress(factory().cuda(), method="syncfree", eps=0.8)
    g = torch.Generator(device="cuda").manual_seed(0)

    def batch():
        if len(shape) == 4:  # spatially smooth, as post-ReLU feature maps are
            big = torch.randn(shape[0], shape[1], shape[2] + 2, shape[3] + 2, device="cuda", generator=g)
            return F.relu(F.avg_pool2d(big, 3, 1)).requires_grad_()
        return F.relu(torch.randn(shape, device="cuda", generator=g)).requires_grad_()

    def step():
        layer.zero_grad(set_to_none=True)
        y = layer(batch())
        y.backward(torch.randn(y.shape, device="cuda", generator=g))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    state = actcomp.layer_state(layer).method_state
    state.wait()
    assert state.records_read == state.steps - 1 and state.initialisations == 1
    assert len(state.fractions) == len(shape) and torch.isfinite(layer.weight.grad).all()


def test_syncfree_step_replays_as_a_cuda_graph():
    """The step has static shapes and no sync, so it can be captured once and replayed."""
    state = SyncFreeState()
    x = F.relu(torch.randn(16, 24, 14, 14, device="cuda"))
    for _ in range(3):
        syncfree_hosvd(x, 0.8, state)
    bases, iterations = [q.clone() for q in state.bases], state._iteration_counts(4)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            syncfree_step(static_x, 0.8, bases, iterations)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = syncfree_step(static_x, 0.8, bases, iterations)
    fresh = F.relu(torch.randn(16, 24, 14, 14, device="cuda"))
    static_x.copy_(fresh)
    graph.replay()
    eager = syncfree_step(fresh, 0.8, bases, iterations)
    assert torch.allclose(static_out[2], eager[2], rtol=1e-4, atol=1e-5)
    assert rel_err(static_out[0].reconstruct(), eager[0].reconstruct()) < 1e-4


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
