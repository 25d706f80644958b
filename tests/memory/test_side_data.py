"""Side data actcomp keeps about tensors (a kernel's mark, a layer input's factors, the generic
packer's result) lives in weak-keyed maps, as torch keeps such data: nothing is set on the
tensor, the caches hit as before (same version, same settings) and an entry dies with its
tensor."""

from __future__ import annotations

import gc

import torch
from torch import nn

import actcomp
from actcomp.core import dispatch, state as layer_states
from actcomp.core.config import CompressionConfig
from actcomp.core.dispatch import kept_policy, mark_kept, marked_policy
from actcomp.core.state import LayerState
from actcomp.methods import InputLayout
from actcomp.policies import generic
from actcomp.policies.generic import GenericPacker


def _dies_with_its_tensor(table, make_entry) -> None:
    gc.collect()
    before = len(table)
    t = make_entry()
    assert len(table) == before + 1
    del t
    gc.collect()
    assert len(table) == before


def test_mark_is_kept_apart_from_the_tensor():
    t = torch.ones(4)
    mark_kept("bits", t)
    assert marked_policy(t) == "bits" and kept_policy(t, t) == "bits"
    assert "_actcomp_policy" not in t.__dict__ and not hasattr(t, "_actcomp_policy")
    assert marked_policy(torch.ones(4)) is None and kept_policy(torch.ones(4), torch.ones(4)) == "plain"
    assert marked_policy(t.view(2, 2)) is None  # a view is another tensor, as an attribute was


def test_mark_dies_with_its_tensor():
    def make():
        t = torch.ones(3)
        mark_kept("indices", t)
        return t

    _dies_with_its_tensor(dispatch._MARKED, make)


def _layer_state() -> LayerState:
    return LayerState(name="l", layer_type="Linear", config=CompressionConfig("hosvd", 0.9))


def test_factors_of_an_activation_are_shared_and_die_with_it():
    layout = InputLayout(sample_modes=1)
    a, b = _layer_state(), _layer_state()
    leaf = torch.randn(6, 5, requires_grad=True)
    x = leaf * 2  # an activation of this step (has a grad_fn)
    first = a.compress(x, layout)
    assert "_actcomp_factors" not in x.__dict__
    assert b.compress(x, layout) is first and b.shared and b.last.kept_bytes == 0
    with torch.no_grad():
        x.add_(1)  # a new version: factored anew
    assert b.compress(x, layout) is not first and not b.shared

    def make():
        y = leaf * 3
        a.compress(y, layout)
        return y

    _dies_with_its_tensor(layer_states._FACTORS, make)


def test_leaf_inputs_are_not_cached():
    gc.collect()
    before = len(layer_states._FACTORS)
    x = torch.randn(6, 5)
    _layer_state().compress(x, InputLayout(sample_modes=1))
    assert len(layer_states._FACTORS) == before


def test_packed_tensor_is_cached_per_version_and_eps_and_dies_with_it():
    packer = GenericPacker(eps=0.9, threshold=0)
    t = torch.randn(16, 16).cumsum(0)
    packed = packer(t)
    assert packed is not None and "_actcomp_packed" not in t.__dict__
    assert packer(t) is packed
    assert GenericPacker(eps=0.5, threshold=0)(t) is not packed  # another eps
    t.add_(1)
    assert packer(t) is not packed  # another version

    def make():
        u = torch.randn(16, 16).cumsum(0)
        assert packer(u) is not None
        return u

    _dies_with_its_tensor(generic._PACKED, make)


def test_a_training_step_leaves_no_side_data_behind():
    tables = (dispatch._MARKED, layer_states._FACTORS, generic._PACKED)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    actcomp.compress(model, eps=0.9, neighbours=actcomp.Neighbours(generic=True, threshold=0))
    gc.collect()
    before = [len(t) for t in tables]
    x = torch.randn(64, 32, requires_grad=True)
    model(x).square().sum().backward()
    del x
    gc.collect()
    marked = [t for t in dispatch._MARKED.keys() if not any(t is p for p in model.parameters())]
    assert len(marked) == before[0]  # only the weights the kernels marked stay marked
    assert [len(t) for t in tables[1:]] == before[1:]
