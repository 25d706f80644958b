"""Layers that run plain autograd under their method (method ``none``, Gradient Filter on
Linear) share one definition of "trained": a parameter of the layer other than its bias
requires grad. Their stats then say the input was kept, else nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import actcomp
from actcomp.core.state import plain_kept_bytes, trains_weight
from actcomp.kernels import base as kernel_registry


class ScaledLinear(nn.Linear):
    """A Linear (same forward) with one more parameter of its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.ones(()))


def _layer(frozen_weight: bool, scale_trains: bool, bias_trains: bool) -> nn.Module:
    layer = ScaledLinear(6, 4)
    layer.weight.requires_grad_(not frozen_weight)
    layer.scale.requires_grad_(scale_trains)
    layer.bias.requires_grad_(bias_trains)
    return layer


@pytest.mark.parametrize("frozen_weight", [False, True])
@pytest.mark.parametrize("scale_trains", [False, True])
@pytest.mark.parametrize("bias_trains", [False, True])
def test_trained_is_any_parameter_but_the_bias(frozen_weight, scale_trains, bias_trains):
    layer = _layer(frozen_weight, scale_trains, bias_trains)
    assert trains_weight(layer) is (not frozen_weight or scale_trains)
    x = torch.randn(3, 6)
    assert plain_kept_bytes(layer, x) == (x.numel() * 4 if trains_weight(layer) else 0)


@pytest.mark.parametrize("frozen_weight", [False, True])
@pytest.mark.parametrize("scale_trains", [False, True])
def test_every_plain_path_reports_the_same_bytes(frozen_weight, scale_trains):
    """method none (every layer plain) and gradient_filter (Linear plain) agree."""
    kept = {}
    for method in ("none", "gradient_filter"):
        torch.manual_seed(0)
        model = nn.Sequential(_layer(frozen_weight, scale_trains, True))
        actcomp.compress(model, ["0"], method=method, neighbours=None)  # named: "all" leaves a frozen layer out
        x = torch.randn(5, 6, requires_grad=True)
        model(x).sum().backward()
        kept[method] = actcomp.stats(model)["0"].kept_bytes
    expected = 5 * 6 * 4 if (not frozen_weight or scale_trains) else 0
    assert kept == {"none": expected, "gradient_filter": expected}


def test_unbatched_input_of_a_plain_layer_is_reported_as_given():
    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    actcomp.compress(model, method="none", neighbours=None)
    model(torch.randn(2, 5, 5, requires_grad=True)).sum().backward()
    assert actcomp.stats(model)["0"].input_shape == (2, 5, 5)


class Doubler(nn.Module):
    """A module run by a custom kernel (register_kernel, no layer family)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.weight


@pytest.fixture
def custom_kernel():
    calls = []

    def kernel(module, x, state):
        calls.append(state.config.method)
        state.record(x, (), 0)
        return x * module.weight

    actcomp.register_kernel(Doubler)(kernel)
    try:
        yield calls
    finally:
        del kernel_registry._REGISTRY[Doubler]
        kernel_registry._RESOLVED.clear()


@pytest.mark.parametrize("method, runs_kernel", [("none", False), ("gradient_filter", True), ("hosvd", True)])
def test_custom_kernel_runs_plain_only_when_the_method_runs_every_layer_plainly(custom_kernel, method, runs_kernel):
    model = nn.Sequential(Doubler())
    actcomp.compress(model, method=method, neighbours=None)
    x = torch.randn(4, 3, requires_grad=True)
    model(x).sum().backward()
    assert custom_kernel == ([method] if runs_kernel else [])
    if not runs_kernel:
        assert actcomp.stats(model)["0"].kept_bytes == x.numel() * 4
