"""The neighbour registry: lookup through the class hierarchy (the kernel registry's rule),
registrations that say when they apply and what the planner may trade, and the method that
factors a neighbour's tensors named by the method registry."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from torch import Tensor, nn

import actcomp
from actcomp.attach import swap
from actcomp.core.config import CompressionConfig
from actcomp.methods import method_class
from actcomp.policies import base as registry
from actcomp.policies import (
    Neighbours,
    factor_config,
    neighbour_handler,
    neighbour_registration,
    register_neighbour,
    tradeable_neighbour,
)


class KeepsReLUForward(nn.ReLU):
    """A subclass that inherits ReLU's forward (like NonDynamicallyQuantizableLinear)."""


class OwnForward(nn.ReLU):
    """A subclass that computes something else: it must not get ReLU's mask policy."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x) * 2


class Grandchild(KeepsReLUForward):
    pass


@pytest.mark.parametrize("cls", [KeepsReLUForward, Grandchild])
def test_subclass_keeping_forward_gets_the_base_policy(cls):
    assert neighbour_handler(cls) is neighbour_handler(nn.ReLU) is not None
    model = nn.Sequential(nn.Linear(6, 6), cls())
    actcomp.compress(model, eps=0.9)
    assert isinstance(actcomp.layer_state(model[1]), actcomp.NeighbourState)
    x = torch.randn(4, 6, requires_grad=True)
    model(x).sum().backward()
    assert actcomp.layer_state(model[1]).last.method == "bits"
    assert type(actcomp.restore(model)[1]) is cls


def test_subclass_overriding_forward_has_no_policy():
    assert neighbour_registration(OwnForward) is None
    model = nn.Sequential(nn.Linear(6, 6), OwnForward())
    actcomp.compress(model, eps=0.9)
    assert actcomp.layer_state(model[1]) is None
    x = torch.randn(4, 6)
    assert torch.equal(model(x), torch.relu(model[0](x)) * 2)


def test_compressed_class_maps_to_its_base():
    module = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    actcomp.compress(module, eps=0.9)
    assert neighbour_registration(type(module[1])) is neighbour_registration(nn.ReLU)


class Toy(nn.Module):
    """A neighbour type the tests register (and unregister)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 3


def _toy_handler(module: nn.Module, x: Tensor, state) -> Tensor | None:
    state.keep("nothing", x, 0)
    return x * 3


@contextlib.contextmanager
def registered(module_type, **options):
    register_neighbour(module_type, **options)(_toy_handler)
    try:
        yield
    finally:
        del registry._REGISTRY[module_type]
        registry._RESOLVED.clear()


def test_registration_says_when_it_applies():
    with registered(Toy, applies=lambda neighbours: neighbours.generic):
        model = nn.Sequential(nn.Linear(4, 4), Toy())
        actcomp.compress(model, eps=0.9)
        assert actcomp.layer_state(model[1]) is None
        actcomp.compress(model, eps=0.9, neighbours=Neighbours(generic=True))
        assert isinstance(actcomp.layer_state(model[1]), actcomp.NeighbourState)
        actcomp.compress(model, eps=0.9)  # no longer applies: put back
        assert actcomp.layer_state(model[1]) is None and type(model[1]) is Toy
    assert neighbour_registration(Toy) is None


@pytest.mark.parametrize("activations, attached", [("exact", False), ("bits2", True)])
def test_smooth_activations_apply_only_when_not_exact(activations, attached):
    assert neighbour_registration(nn.GELU).applies(Neighbours(activations=activations)) is attached
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    actcomp.compress(model, eps=0.9, neighbours=Neighbours(activations=activations))
    assert (actcomp.layer_state(model[1]) is not None) is attached


def test_swap_has_no_per_policy_or_per_method_special_case():
    source = inspect.getsource(swap)
    for special in ("SMOOTH", "policies.smooth", ".activations", 'method == "none"'):
        assert special not in source


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
def test_batchnorm_on_batch_statistics_is_tradeable(cls):
    assert tradeable_neighbour(cls(3).train())
    assert not tradeable_neighbour(cls(3).eval())
    assert tradeable_neighbour(cls(3, track_running_stats=False).eval())
    assert not tradeable_neighbour(nn.ReLU())
    assert not tradeable_neighbour(nn.Linear(2, 2))


def test_tradeable_is_the_registrations_field():
    assert not tradeable_neighbour(Toy())
    with registered(Toy, tradeable=lambda module: True):
        assert tradeable_neighbour(Toy())


def test_factor_config_names_the_method_from_the_method_registry(monkeypatch):
    assert factor_config(CompressionConfig("asi", 0.7), Neighbours()) == CompressionConfig("asi", 0.7)
    assert factor_config(CompressionConfig("none"), Neighbours(eps=0.6)).method == method_class("none").neighbour_method
    monkeypatch.setattr(method_class("gradient_filter"), "neighbour_method", "svd")
    assert factor_config(CompressionConfig("gradient_filter", 0.8), Neighbours()) == CompressionConfig("svd", 0.8)


def test_a_sampled_method_gives_its_neighbours_its_truncated_twin_when_it_asks_for_it(monkeypatch):
    assert factor_config(CompressionConfig("hosvd_unbiased", 0.9), Neighbours()) == CompressionConfig("hosvd_unbiased", 0.9)
    for method in ("hosvd_unbiased", "svd_unbiased"):
        monkeypatch.setattr(method_class(method), "truncated_neighbours", True)
    assert factor_config(CompressionConfig("hosvd_unbiased", 0.9), Neighbours()) == CompressionConfig("hosvd", 0.9)
    assert factor_config(CompressionConfig("svd_unbiased", 0.9), Neighbours(eps=0.95)) == CompressionConfig("svd", 0.95)


@pytest.mark.parametrize("bad", ["ReLU", 42, int])
def test_register_neighbour_refuses_what_is_not_a_module_type_or_a_qualified_name(bad):
    with pytest.raises(TypeError, match="nn.Module subclass or its qualified name"):
        register_neighbour(bad)(_toy_handler)


def test_a_neighbour_type_registered_by_qualified_name_is_matched_by_it(monkeypatch):
    from actcomp.policies import base as registry

    monkeypatch.setattr(registry, "_BY_NAME", dict(registry._BY_NAME))
    monkeypatch.setattr(registry, "_RESOLVED", {})
    Named = type("Named", (nn.Module,), {"__module__": "somepkg.acts", "forward": lambda self, x: x})
    assert registry.neighbour_registration(Named) is None
    register_neighbour("somepkg.acts.Named")(_toy_handler)
    assert registry.neighbour_handler(Named) is _toy_handler
    assert "somepkg.acts.Named" in registry.registered_neighbours()
