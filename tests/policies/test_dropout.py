"""Dropout keeps its mask as bits; outputs and gradients equal plain dropout's (same RNG)."""

import copy

import pytest
import torch
from torch import nn

import actcomp


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_mask_same_gradients_bits_kept(inplace, dtype):
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3, inplace=inplace), nn.Linear(16, 4)).to(dtype)
    reference = copy.deepcopy(model)
    actcomp.compress(model, ["2"], eps=1.0)
    x = torch.randn(6, 5, 8, dtype=dtype)
    results = []
    for m in (model, reference):
        torch.manual_seed(3)
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xi.grad))
    (y, gx), (y_ref, gx_ref) = results
    assert torch.allclose(y, y_ref, rtol=1e-6 if dtype == torch.float32 else 1e-12) and torch.equal(gx, gx_ref)
    with actcomp.count_saved(model) as saved:
        model(x.requires_grad_())
    assert ((6 * 5 * 16 + 7) // 8,) in [s for s, d in saved.shapes if d == torch.uint8]


def test_eval_dropout_is_identity():
    model = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.5))
    actcomp.compress(model, eps=0.9)
    model.eval()
    x = torch.randn(3, 8)
    assert torch.equal(model(x), model[0](x))
