"""ReLU-family activations keep a packed 1-bit mask, and their gradients are plain autograd's."""

import copy

import pytest
import torch
from torch import nn

import actcomp

ACTIVATIONS = [
    lambda inplace: nn.ReLU(inplace),
    lambda inplace: nn.ReLU6(inplace),
    lambda inplace: nn.LeakyReLU(0.1, inplace),
    lambda inplace: nn.Hardtanh(-0.5, 0.7, inplace),
]


@pytest.mark.parametrize("make", ACTIVATIONS, ids=["relu", "relu6", "leaky", "hardtanh"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 7, 5)])
def test_mask_is_exact_and_one_bit(make, inplace, shape):
    torch.manual_seed(0)
    act = make(inplace)
    model = nn.Sequential(nn.Linear(5, 5), act, nn.Linear(5, 3)).double()
    reference = copy.deepcopy(model)
    actcomp.compress(model, ["2"], eps=1.0)
    x = torch.randn(shape, dtype=torch.float64) * 3
    x[..., 0] = 0.0  # exactly on the kinks
    out = {}
    for m in (model, reference):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.ones_like(y))
        out[id(m)] = (y.detach(), xi.grad, [p.grad for p in m.parameters()])
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = out[id(model)], out[id(reference)]
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(gp, gp_ref))  # the Linear's dW from exact factors
    hidden = torch.Size((*shape[:-1], 5))
    with actcomp.count_saved(model) as saved:
        model(x.requires_grad_())
    masks = [n for s, d in saved.shapes for n in [s] if d == torch.uint8]
    assert masks == [((hidden.numel() + 7) // 8,)]


def test_relu_output_freed_by_the_next_compressed_conv():
    """Conv-ReLU-Conv: the ReLU keeps bits, the conv factors; nothing of full size is kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(4, 3, 16, 16).requires_grad_()
    actcomp.compress(model, eps=0.9)
    with actcomp.count_saved(model) as saved:
        model(x)
    full = 4 * 8 * 16 * 16 * 4
    assert all(s != (4, 8, 16, 16) for s, _ in saved.shapes)
    factors = sum(st.kept_bytes for st in actcomp.stats(model).values())
    assert saved.saved_bytes == factors + full // 32
