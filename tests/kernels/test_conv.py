"""Conv1d / Conv2d kernels against plain autograd, in float64, over a grid of configurations."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.linalg.decompose import hosvd, tracked_hosvd, truncated_svd
from actcomp.kernels.conv import ConvGeometry, tucker_weight_grad
from conftest import rel_err

# (dims, in, out, kernel, stride, padding, dilation, groups, padding_mode)
LAYERS = [
    (2, 4, 6, 3, 1, 1, 1, 1, "zeros"),  # dense 3x3
    (2, 4, 6, 1, 1, 0, 1, 1, "zeros"),  # pointwise
    (2, 4, 6, 3, 2, 1, 1, 1, "zeros"),  # strided
    (2, 4, 6, (3, 2), (2, 1), (1, 0), (2, 1), 1, "zeros"),  # rectangular, dilated
    (2, 4, 6, 3, 1, 1, 1, 2, "zeros"),  # grouped
    (2, 6, 6, 3, 1, 1, 1, 6, "zeros"),  # depthwise
    (2, 3, 6, 3, 2, 1, 1, 3, "zeros"),  # depthwise, channel multiplier 2
    (2, 4, 6, 4, 1, "same", 1, 1, "zeros"),  # 'same' with an even kernel: asymmetric padding
    (2, 4, 6, 2, 1, "same", 2, 2, "zeros"),  # 'same', dilated, grouped
    (2, 4, 6, 3, 1, "valid", 1, 1, "zeros"),
    (2, 4, 6, 3, 1, 1, 1, 1, "reflect"),
    (2, 4, 6, 3, 2, 2, 1, 2, "replicate"),
    (2, 4, 4, 3, 1, 1, 1, 4, "circular"),
    (2, 4, 6, 4, 1, "same", 1, 1, "reflect"),  # asymmetric reflect padding
    (1, 4, 6, 3, 1, 1, 1, 1, "zeros"),
    (1, 4, 6, 5, 2, 2, 2, 2, "zeros"),
    (1, 6, 6, 3, 1, 1, 1, 6, "circular"),
    (1, 4, 6, 4, 1, "same", 1, 1, "replicate"),
]
IDS = [f"{d}d-{i}-{o}-k{k}-s{s}-p{p}-d{dl}-g{g}-{m}" for d, i, o, k, s, p, dl, g, m in LAYERS]


def make_layer(spec, bias):
    dims, c_in, c_out, k, s, p, dl, g, mode = spec
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    return cls(c_in, c_out, k, s, p, dl, g, bias=bias, padding_mode=mode).double()


def make_input(layer, batch=5):
    spatial = (9,) * (layer.weight.ndim - 2)
    # Post-ReLU and smooth, like real activations, so that eps < 1 truncates something.
    x = torch.randn(batch, layer.in_channels, *(n + 2 for n in spatial), dtype=torch.float64)
    pool = F.avg_pool1d if len(spatial) == 1 else F.avg_pool2d
    return F.relu(pool(x, 3, 1)).requires_grad_()


def grads(layer, x):
    layer.zero_grad()
    x.grad = None
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    out = [x.grad.clone(), layer.weight.grad.clone()]
    if layer.bias is not None:
        out.append(layer.bias.grad.clone())
    return y.detach(), out


@pytest.mark.parametrize("spec", LAYERS, ids=IDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["hosvd", "asi", "svd"])
def test_eps_one_equals_plain_autograd(spec, bias, method):
    layer = make_layer(spec, bias)
    x = make_input(layer)
    torch.manual_seed(1)
    y_ref, ref = grads(layer, x)
    actcomp.compress(layer, method=method, eps=1.0)
    torch.manual_seed(1)
    y, ours = grads(layer, x)
    assert torch.equal(y, y_ref)  # the forward is the plain forward
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("spec", LAYERS, ids=IDS)
@pytest.mark.parametrize("method, eps", [("hosvd", 0.7), ("hosvd", 0.9), ("svd", 0.7)])
def test_eps_below_one_equals_autograd_on_reconstruction(spec, method, eps):
    layer = make_layer(spec, True)
    x = make_input(layer)
    factors = hosvd(x, eps) if method == "hosvd" else truncated_svd(x, eps)
    x_hat = factors.reconstruct().requires_grad_()
    assert rel_err(x_hat, x) > 1e-6  # something was truncated
    torch.manual_seed(1)
    _, on_reconstruction = grads(layer, x_hat)
    torch.manual_seed(1)
    _, exact = grads(layer, x)
    actcomp.compress(layer, method=method, eps=eps)
    torch.manual_seed(1)
    _, ours = grads(layer, x)
    assert rel_err(ours[1], on_reconstruction[1]) < 1e-10  # dW from the factors
    assert rel_err(ours[0], exact[0]) < 1e-10  # dX exact from the weight
    assert rel_err(ours[2], exact[2]) < 1e-10  # db exact
    assert actcomp.stats(layer)[""].ranks == (factors.ranks if method == "hosvd" else (factors.rank,))


@pytest.mark.parametrize("spec", [s for s in LAYERS if s[7] > 1], ids=[i for s, i in zip(LAYERS, IDS) if s[7] > 1])
def test_both_channel_routes_agree(spec):
    layer = make_layer(spec, False)
    x = make_input(layer).detach()
    y = layer(x)
    dy = torch.randn_like(y)
    tucker = hosvd(x, 0.8)
    geometry = ConvGeometry.of(layer)
    contract = tucker_weight_grad(tucker, dy, layer.weight.shape, geometry, route="contract")
    expand = tucker_weight_grad(tucker, dy, layer.weight.shape, geometry, route="expand")
    assert rel_err(contract, expand) < 1e-12
    with pytest.raises(ValueError, match="route"):
        tucker_weight_grad(tucker, dy, layer.weight.shape, geometry, route="sideways")


def test_frozen_weight_keeps_nothing_and_input_grad_is_exact():
    layer = make_layer(LAYERS[0], True)
    layer.weight.requires_grad_(False)
    x = make_input(layer)
    y_ref = layer(x)
    dy = torch.randn_like(y_ref)
    (ref,) = torch.autograd.grad(y_ref, x, dy)
    actcomp.compress(layer)
    with actcomp.count_saved(layer) as saved:
        y = layer(x)
    (ours,) = torch.autograd.grad(y, x, dy)
    assert saved.saved_bytes == 0
    assert rel_err(ours, ref) < 1e-12
    assert actcomp.stats(layer)[""].kept_bytes == 0


@pytest.mark.parametrize("dims", [1, 2])
def test_unbatched_input(dims):
    layer = make_layer((dims, 3, 4, 3, 1, 1, 1, 1, "zeros"), True)
    x = make_input(layer, batch=1)[0].detach().requires_grad_()
    torch.manual_seed(1)
    _, ref = grads(layer, x)
    actcomp.compress(layer, eps=1.0)
    torch.manual_seed(1)
    _, ours = grads(layer, x)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("method", ["hosvd", "svd"])
def test_bfloat16_autocast_factors_in_activation_dtype(method):
    layer = nn.Conv2d(4, 6, 3, padding=1)
    x = F.relu(torch.randn(4, 4, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = layer(x)
    actcomp.compress(layer, method=method, eps=0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with actcomp.count_saved(layer) as saved:
            y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all()
    # The factors in bf16; the weight saved as the float32 parameter itself, not a bf16 copy.
    assert saved.saved_bytes == actcomp.stats(layer)[""].kept_bytes
    assert [dtype for _, dtype in saved.shapes] == [torch.float32] + [torch.bfloat16] * (len(saved.shapes) - 1)


@pytest.mark.parametrize("dims, c", itertools.product([1, 2], [5]))
def test_nan_activation_raises_naming_the_layer(dims, c):
    model = nn.Sequential(make_layer((dims, c, 4, 3, 1, 1, 1, 1, "zeros"), True))
    actcomp.compress(model)
    x = make_input(model[0]).detach()
    x[0, 0, 0] = float("nan")
    cls = "Conv1d" if dims == 1 else "Conv2d"
    with pytest.raises(FloatingPointError, match=f"layer '0' \\({cls}\\).*NaN or Inf"):
        model(x)


@pytest.mark.parametrize("spec", LAYERS, ids=IDS)
def test_asi_tracked_step_equals_autograd_on_reconstruction(spec):
    """Second step of method 'asi' (subspaces carried from the first): dW equals autograd on the
    reconstruction the tracker gives, dX and db stay exact."""
    layer = make_layer(spec, True)
    actcomp.compress(layer, method="asi", eps=0.8)
    first = make_input(layer)
    layer(first).sum().backward()
    x = (first.detach() + 0.05 * torch.randn_like(first)).requires_grad_()
    state = actcomp.layer_state(layer)
    x_hat = tracked_hosvd(x, 0.8, copy.deepcopy(state.tracker)).reconstruct().requires_grad_()
    recomputed = state.tracker.recomputed
    torch.manual_seed(1)
    _, ours = grads(layer, x)
    assert state.tracker.recomputed == recomputed  # the tracked path ran, no Gram + eigh
    actcomp.restore(layer)
    torch.manual_seed(1)
    _, on_reconstruction = grads(layer, x_hat)
    torch.manual_seed(1)
    _, exact = grads(layer, x)
    assert rel_err(ours[1], on_reconstruction[1]) < 1e-10
    assert rel_err(ours[0], exact[0]) < 1e-10 and rel_err(ours[2], exact[2]) < 1e-10


@pytest.mark.parametrize("dims", [1, 2])
def test_gradient_filter_r1_on_pointwise_conv_is_exact(dims):
    layer = make_layer((dims, 4, 6, 1, 1, 0, 1, 1, "zeros"), True)
    x = make_input(layer)
    torch.manual_seed(1)
    _, ref = grads(layer, x)
    actcomp.compress(layer, config=actcomp.CompressionConfig("gradient_filter", patch=1))
    torch.manual_seed(1)
    _, ours = grads(layer, x)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("patch, stride, groups", [(2, 1, 1), (4, 1, 2), (3, 2, 1), (2, 1, 4)])
def test_gradient_filter_matches_its_definition(patch, stride, groups):
    """dX: plain backward of the patch-averaged dY; dW: r^2 sum gbar * xbar on every tap;
    the layer keeps the input averaged over (r*stride)^2 regions."""
    layer = nn.Conv2d(4, 8, 3, stride, 1, groups=groups, bias=True).double()
    x = make_input(layer, batch=3)
    actcomp.compress(layer, config=actcomp.CompressionConfig("gradient_filter", patch=patch))
    with actcomp.count_saved(layer) as saved:
        y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    region = patch * stride
    xbar = F.avg_pool2d(x.detach(), region, region, ceil_mode=True)
    assert saved.saved_bytes == xbar.numel() * 8 == actcomp.stats(layer)[""].kept_bytes
    gbar = F.avg_pool2d(dy, patch, patch, ceil_mode=True)
    filtered = gbar.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, : dy.shape[2], : dy.shape[3]]
    actcomp.restore(layer)
    (dx,) = torch.autograd.grad(layer(x), x, filtered)
    assert rel_err(x.grad, dx) < 1e-12
    n = min(gbar.shape[2], xbar.shape[2]), min(gbar.shape[3], xbar.shape[3])
    g = gbar[:, :, : n[0], : n[1]].reshape(3, groups, 8 // groups, -1)
    xb = xbar[:, :, : n[0], : n[1]].reshape(3, groups, 4 // groups, -1)
    per_channel = torch.einsum("bgop,bgcp->goc", g, xb).reshape(8, 4 // groups) * patch**2
    assert rel_err(layer.weight.grad, per_channel[:, :, None, None].expand_as(layer.weight)) < 1e-12
    assert rel_err(layer.bias.grad, dy.sum((0, 2, 3))) < 1e-12


def test_gradient_filter_leaves_linear_exact():
    layer = nn.Linear(6, 3).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    _, ref = grads(layer, x)
    actcomp.compress(layer, config=actcomp.CompressionConfig("gradient_filter", patch=2))
    torch.manual_seed(1)
    _, ours = grads(layer, x)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert actcomp.stats(layer)[""].kept_bytes == x.numel() * 8


@pytest.mark.parametrize("method", ["hosvd", "asi", "svd"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "called_twice"])
def test_memory_layouts_and_reuse(method, layout):
    """channels_last and non-contiguous inputs, and one module called twice in a forward."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1).double()
    x = torch.randn(4, 6, 9, 9, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3)
    model = nn.Sequential(conv, nn.Tanh(), conv) if layout == "called_twice" else conv
    reference = copy.deepcopy(model)
    actcomp.compress(model, method=method, eps=1.0)
    for _ in range(2):  # asi: the second step runs on carried subspaces
        for m in (model, reference):
            m.zero_grad()
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = model(a), reference(b)
        dy = torch.randn_like(yb)
        ya.backward(dy)
        yb.backward(dy)
        assert torch.equal(ya, yb) and rel_err(a.grad, b.grad) < 1e-12
        for p, q in zip(model.parameters(), reference.parameters()):
            assert rel_err(p.grad, q.grad) < 1e-10
