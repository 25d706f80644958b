"""Library calls with arguments that cannot work raise ValueError naming the argument, not an
IndexError or TypeError from deep inside (issue 22, item 8)."""

import pytest
import torch
from torch import nn

import actcomp
from actcomp.memory.plan import plan


@pytest.mark.parametrize("layers", [None, 3, [1, 2]])
def test_compress_names_a_layers_argument_it_cannot_read(layers):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"layers=.* is not understood: use 'all', 'last:N'"):
        actcomp.compress(model, layers=layers)
    assert not actcomp.compressed_layers(model)


def test_plan_refuses_an_empty_eps_grid():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    batch = (torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="eps_grid is empty"):
        plan(model, [batch], budget="1MiB", eps_grid=(), loss_fn=nn.functional.cross_entropy)
