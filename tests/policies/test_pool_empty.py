"""An empty batch runs through a max pool after a compressed layer (issue 22, item 6): the
README says empty batches run everywhere, forward and backward, with zero gradients."""

import pytest
import torch
from torch import nn

import actcomp

CASES = [
    ("max2d", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)), (0, 3, 8, 8)),
    ("max2d-overlapping", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1)), (0, 3, 9, 9)),
    ("max1d", lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.MaxPool1d(2)), (0, 3, 10)),
    ("max3d", lambda: nn.Sequential(nn.Conv3d(3, 4, 1), nn.MaxPool3d(2)), (0, 3, 4, 4, 4)),
    ("max2d-then-linear", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5)), (0, 3, 8, 8)),
]


@pytest.mark.parametrize("name, make, shape", CASES, ids=[c[0] for c in CASES])
def test_an_empty_batch_through_a_max_pool_after_a_compressed_layer(name, make, shape):
    model = make()
    actcomp.compress(model)
    assert any(type(m).__name__ == f"Compressed{type(m).__mro__[1].__name__}" and "Pool" in type(m).__name__ for m in model.modules())
    x = torch.zeros(shape, requires_grad=True)
    y = model(x)
    assert y.shape[0] == 0
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for p in model.parameters():
        assert p.grad is not None and not p.grad.any()


def test_the_empty_batch_leaves_the_next_step_as_before():
    """A step on an empty batch between two real ones changes nothing the real ones compute."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2))
    actcomp.compress(model, eps=1.0)
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    first = model[0].weight.grad.clone()
    model.zero_grad()
    model(torch.zeros(0, 3, 8, 8)).sum().backward()
    model.zero_grad()
    model(x).sum().backward()
    assert torch.equal(model[0].weight.grad, first)
