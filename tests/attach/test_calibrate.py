"""actcomp.calibrate and method oneshot on whole models: calibrated bases are the sequential
HOSVD of the batches stacked on the batch mode, training steps then only project, the state
survives deepcopy and state_dict, and plan() and fit() can choose the method."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.linalg import projected
from actcomp.linalg.decompose import hosvd
from actcomp.linalg.projected import fixed_order
from conftest import rel_err


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    ).double()


def batches(n, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def test_calibrated_bases_are_the_hosvd_of_the_stacked_batches():
    model = actcomp.compress(net(), layers=["0", "3"], method="oneshot", eps=0.8)
    data = batches(3)
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    ranks = actcomp.calibrate(model, data, loss_fn=F.cross_entropy)
    assert set(ranks) == {"0", "3"}
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # running statistics untouched
    assert torch.equal(rng, torch.get_rng_state())
    inputs = {"0": [], "3": []}
    hooks = [model[int(n)].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0])) for n in inputs]
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for h in hooks:
        h.remove()
    for name, xs in inputs.items():
        stacked = torch.cat(xs)
        order = fixed_order(stacked.shape, 1)
        ref = hosvd(stacked, 0.8, order=order + [0])
        state = actcomp.layer_state(model[int(name)]).method_state
        assert sorted(state.order) == sorted(order) and ranks[name] == tuple(ref.ranks[1:])
        for n in order:  # the same subspaces (eigenvectors up to sign)
            assert rel_err(state.bases[n] @ state.bases[n].T, ref.factors[n] @ ref.factors[n].T) < 1e-8


def test_training_steps_after_calibration_only_project(monkeypatch):
    model = actcomp.compress(net(), layers=["0", "3"], config=actcomp.CompressionConfig("oneshot", 0.8, tolerance=0.2))
    data = batches(3)
    actcomp.calibrate(model, data[:2], loss_fn=F.cross_entropy)
    hosvds = []
    monkeypatch.setattr(projected, "hosvd", lambda *a, **k: hosvds.append(a[0].shape) or hosvd(*a, **k))
    F.cross_entropy(model(data[2][0]), data[2][1]).backward()
    for name in ("0", "3"):
        state = actcomp.layer_state(model[int(name)]).method_state
        assert state.steps == 1 and state.refreshes == 1 and float(state.kept) >= 0.6**3
        assert actcomp.stats(model)[name].ranks[1:] == tuple(state.bases[n].shape[1] for n in (1, 2, 3))
    assert hosvds == [(4, 6, 8, 8)]  # the BatchNorm's x_hat, calibrated on its first step


def test_calibration_names_a_layer_given_another_shape():
    model = actcomp.compress(net(), layers=["0"], method="oneshot")
    with pytest.raises(ValueError, match=re.escape("layer '0' (Conv2d)")):
        actcomp.calibrate(model, batches(1) + batches(1, size=10), loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="at least one batch"):
        actcomp.calibrate(model, [])


def test_state_survives_deepcopy_and_layer_state_dict():
    model = actcomp.compress(net(), layers="all", config=actcomp.CompressionConfig("oneshot", 0.8, tolerance=0.5))
    data = batches(2)
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    twin = copy.deepcopy(model)
    fresh = actcomp.compress(net(), layers="all", method="oneshot")  # the settings come with the state
    for (name, m), other in zip(model.named_modules(), fresh.modules()):
        state = actcomp.layer_state(m)
        if state is not None:
            actcomp.layer_state(other).load_state_dict(copy.deepcopy(state.state_dict()))
    grads = []
    for copy_ in (model, twin, fresh):
        copy_.zero_grad()
        F.cross_entropy(copy_(data[1][0]), data[1][1]).backward()
        grads.append([p.grad for p in copy_.parameters()])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))
    for copy_ in (model, twin, fresh):  # the carried bases were used: no layer refreshed on the second batch
        states = [s.method_state for m in copy_.modules() if (s := actcomp.layer_state(m)) is not None]
        assert [s.refreshes for s in states if s.steps] == [1] * 4  # three layers and the BatchNorm's x_hat


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).double()


def test_plan_and_fit_choose_oneshot():
    model = net()
    data = batches(1, size=16)
    p = actcomp.plan(model, data, budget="40KiB", loss_fn=F.cross_entropy, method="oneshot", eps_grid=(0.6, 0.9))
    applied = p.apply(copy.deepcopy(model))
    assert {c.method for c in actcomp.compressed_layers(applied).values()} == {"oneshot"}
    model = mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (256,), generator=g)
    reference = copy.deepcopy(model)
    total = actcomp.fit(reference, torch.optim.SGD(reference.parameters(), lr=0.1), "1GiB", (x, y), F.cross_entropy).report.plain.total_bytes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = actcomp.fit(
        model, optimizer, int(total * 0.97), (x, y), F.cross_entropy, allow=("compression",), max_error=1.0, headroom=0.0,
        method="oneshot", timing_steps=1, retime_rounds=0,
    )
    assert step.report.chosen.compression.method == "oneshot"
    assert {c.method for c in actcomp.compressed_layers(model).values()} == {"oneshot"}


def test_token_inputs_fix_the_feature_mode_only():
    torch.manual_seed(0)
    model = actcomp.compress(
        nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).double(), config=actcomp.CompressionConfig("oneshot", 0.9, tolerance=0.3)
    )
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(3, 8, generator=g, dtype=torch.float64)  # features in a fixed 3-dimensional subspace
    data = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64) @ mixing for _ in range(4)]
    ranks = actcomp.calibrate(model, data[:3])
    assert set(ranks) == {"0", "2"} and all(len(r) == 1 for r in ranks.values())  # (batch, tokens) are sample modes
    assert ranks["0"][0] <= 3
    model(data[3]).sum().backward()
    for name in ("0", "2"):
        state = actcomp.layer_state(model[int(name)]).method_state
        assert sorted(state.bases) == [2] and state.steps == 1
    assert actcomp.layer_state(model[0]).method_state.refreshes == 1  # the subspace held: projected only
