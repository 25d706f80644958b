"""The shared autograd Function: observers see the factors and dY in backward; unknown factor
types are refused by name."""

import pytest
import torch
from torch import nn

import actcomp
from actcomp.linalg.factors import Tucker


def test_observers_get_the_factors_and_the_output_gradient():
    layer = nn.Linear(6, 4).double()
    actcomp.compress(layer, eps=1.0)
    seen = []
    actcomp.layer_state(layer).observers.append(seen.append)
    x = torch.randn(5, 3, 6, dtype=torch.float64).cumsum(0)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    (record,) = seen
    assert record.family == "linear" and record.state is actcomp.layer_state(layer)
    assert isinstance(record.factors, Tucker) and torch.equal(record.grad_out, dy)
    assert torch.allclose(record.factors.reconstruct(), x, atol=1e-12)
    assert record.input_shape == x.shape and record.weight_shape == layer.weight.shape


def test_a_method_whose_factors_the_family_cannot_use_is_refused():
    from actcomp.linalg.factors import PatchMeans

    layer = nn.Linear(6, 4)
    actcomp.compress(layer)
    state = actcomp.layer_state(layer)

    class Means(actcomp.Compressor):  # an unregistered method keeping a factor type Linear lacks
        name = "hosvd"

        def compress(self, x, layout, s):
            return PatchMeans(x.detach().clone(), (1,))

    state.compressor = Means(state.config)
    with pytest.raises(TypeError, match="layer '' \\(Linear\\): method 'hosvd' keeps PatchMeans factors, for which the linear kernel has no weight gradient"):
        layer(torch.randn(3, 6))
