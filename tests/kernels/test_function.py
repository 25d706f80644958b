"""The shared autograd Function: observers see the factors and dY in backward; unknown factor
types are refused by name."""

import copy

import pytest
import torch
from torch import nn

import actcomp
from actcomp.linalg.factors import Tucker


def low_rank_input(*shape, rank=2):
    """A float64 input whose channel-mode unfolding has rank ``rank``: its exact factors are
    smaller than it, so the layer keeps them (not the input itself)."""
    return torch.randn(*shape[:-1], rank, dtype=torch.float64) @ torch.randn(rank, shape[-1], dtype=torch.float64)


def test_observers_get_the_factors_and_the_output_gradient():
    layer = nn.Linear(6, 4).double()
    actcomp.compress(layer, eps=0.999999)
    seen = []
    actcomp.layer_state(layer).observers.append(seen.append)
    x = low_rank_input(5, 3, 6)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    (record,) = seen
    assert record.family == "linear" and record.state is actcomp.layer_state(layer)
    assert actcomp.stats(layer)[""].method == "hosvd"
    assert isinstance(record.factors, Tucker) and torch.equal(record.grad_out, dy)
    assert torch.allclose(record.factors.reconstruct(), x, atol=1e-12)
    assert record.input_shape == x.shape and record.weight_shape == layer.weight.shape


def test_a_layer_whose_factors_outweigh_its_input_keeps_the_input_and_observers_see_it_exactly():
    """Never worse than plain: full-rank factors of a small input are larger than it."""
    layer = nn.Linear(6, 4).double()
    reference = copy.deepcopy(layer)
    actcomp.compress(layer, eps=1.0)
    seen = []
    actcomp.layer_state(layer).observers.append(seen.append)
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    with actcomp.count_saved(layer) as saved:
        y = layer(x)
    assert saved.saved_bytes == x.numel() * x.element_size()
    stats = actcomp.stats(layer)[""]
    assert (stats.method, stats.ranks, stats.kept_bytes) == ("plain", (), stats.input_bytes)
    dy = torch.randn_like(y)
    y.backward(dy)
    reference(x).backward(dy)
    assert torch.allclose(layer.weight.grad, reference.weight.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(layer.bias.grad, reference.bias.grad, rtol=1e-12, atol=1e-12)
    (record,) = seen
    assert torch.allclose(record.factors.reconstruct(), x, atol=1e-12)


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
