"""The layer registry's lookup: subclasses that keep their base's forward, types registered by
qualified name, and subclasses that override forward (not supported)."""

import copy
import re

import pytest
import torch
from torch import nn

import actcomp
from actcomp.kernels import base as kernels
from actcomp.kernels import is_supported, registration_for, supported_types
from actcomp.kernels.linear import LINEAR
from conftest import rel_err


class KeepsForward(nn.Linear):
    """Like torch's NonDynamicallyQuantizableLinear: a subclass that does not override forward."""


class OverridesForward(nn.Linear):
    def forward(self, input):  # noqa: A002
        return super().forward(input) * 2


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations made by a test vanish after it (the conformance test checks the registry)."""
    monkeypatch.setattr(kernels, "_REGISTRY", dict(kernels._REGISTRY))
    monkeypatch.setattr(kernels, "_BY_NAME", dict(kernels._BY_NAME))
    monkeypatch.setattr(kernels, "_RESOLVED", {})


def test_subclass_keeping_forward_runs_its_bases_kernel():
    assert registration_for(KeepsForward) is registration_for(nn.Linear)
    assert registration_for(nn.modules.linear.NonDynamicallyQuantizableLinear) is registration_for(nn.Linear)
    torch.manual_seed(0)
    layer = KeepsForward(6, 4).double()
    reference = copy.deepcopy(layer)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    actcomp.compress(layer, eps=1.0)
    assert isinstance(layer, KeepsForward) and type(layer).__name__ == "CompressedKeepsForward"
    y = layer(x)
    assert torch.equal(y, reference(x))
    y.square().sum().backward()
    dx = x.grad.clone()
    x.grad = None
    reference(x).square().sum().backward()
    assert actcomp.layer_state(layer).runs == 1
    assert rel_err(dx, x.grad) < 1e-12 and rel_err(layer.weight.grad, reference.weight.grad) < 1e-12
    actcomp.restore(layer)
    assert type(layer) is KeepsForward


def test_subclass_overriding_forward_is_named_with_the_fix_not_silently_left_out(private_registry):
    from actcomp.attach.select import OverriddenForwardWarning

    assert not is_supported(OverridesForward) and kernels.overridden_base(OverridesForward) is nn.Linear
    model = nn.Sequential(nn.Linear(4, 4), OverridesForward(4, 2))
    with pytest.warns(OverriddenForwardWarning, match=r"OverridesForward \('1'\), a subclass of Linear that overrides forward: actcomp.register_layer"):
        actcomp.compress(model, "all")
    assert list(actcomp.compressed_layers(model)) == ["0"]
    with pytest.raises(ValueError, match=re.escape("layer '1' (OverridesForward) is ") + ".*a subclass of Linear that overrides forward"):
        actcomp.compress(model, ["1"])
    # the fix the message names
    actcomp.register_layer(OverridesForward, family=actcomp.kernels.family_named("linear"))
    actcomp.compress(model, ["1"])
    assert list(actcomp.compressed_layers(model)) == ["0", "1"]


def test_type_registered_by_qualified_name(private_registry):
    def make_type():
        return type("Transposed", (nn.Module,), {"__module__": "somepkg.layers", "forward": lambda self, x: x @ self.weight})

    Transposed = make_type()
    assert not is_supported(Transposed)
    actcomp.register_layer("somepkg.layers.Transposed", family=LINEAR, params=lambda m: (m.weight.t(), None))
    assert is_supported(Transposed) and is_supported(make_type())  # matched by name, whatever the class object
    assert "Transposed (somepkg)" in supported_types()
    layer = Transposed()
    layer.weight = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    x = torch.randn(4, 5, dtype=torch.float64)
    expected_grad = x.T @ torch.ones(4, 3, dtype=torch.float64)
    actcomp.compress(layer, eps=1.0)
    layer(x).sum().backward()
    assert rel_err(layer.weight.grad, expected_grad) < 1e-12  # dW^T carried back to the (in, out) weight


@pytest.mark.parametrize("bad, error", [("Conv1D", ValueError), (3, TypeError), (int, TypeError)])
def test_bad_registrations_are_refused(private_registry, bad, error):
    with pytest.raises(error):
        actcomp.register_layer(bad, family=LINEAR)


@pytest.mark.parametrize(
    "layer, type_name",
    [(nn.Conv3d(2, 3, 3), "Conv3d"), (nn.LayerNorm(4), "LayerNorm"), (OverridesForward(4, 2), "OverridesForward")],
    ids=["geometry-not-covered", "unregistered", "overrides-forward"],
)
def test_second_order_family_names_the_layer_its_type_and_what_is_supported(layer, type_name):
    from actcomp.kernels.base import second_order_family

    message = f"layer 'blocks.0.conv' ({type_name}) has no second-order statistics; supported: Conv2d, Linear"
    with pytest.raises(TypeError, match=re.escape(message)):
        second_order_family(layer, "blocks.0.conv")


def test_second_order_family_is_the_registrys_also_for_compressed_layers():
    from actcomp.kernels.base import second_order_family
    from actcomp.kernels.conv import CONV

    model = nn.Sequential(nn.Conv2d(2, 3, 3), KeepsForward(3, 2))
    actcomp.compress(model, "all")
    assert second_order_family(model[0], "0") is CONV
    assert second_order_family(model[1], "1") is LINEAR


def test_families_are_found_by_name_and_listed_once():
    from actcomp.kernels.base import family_named, registered_families

    families = registered_families()
    assert len({id(f) for f in families}) == len(families)
    assert family_named("linear") is LINEAR
    with pytest.raises(ValueError, match="no registered layer family is called 'rnn'"):
        family_named("rnn")
