"""BatchNorm: nothing kept when frozen in eval mode, factors of x_hat when it trains; at
eps = 1 every gradient and every running statistic equals plain autograd's."""

import copy

import pytest
import torch
from torch import nn

import actcomp


def block(bn):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn, nn.ReLU(), nn.Conv2d(6, 4, 1)).double()


CASES = {
    "train": lambda: nn.BatchNorm2d(6),
    "train-momentum-none": lambda: nn.BatchNorm2d(6, momentum=None),
    "no-running-stats": lambda: nn.BatchNorm2d(6, track_running_stats=False),
    "no-affine": lambda: nn.BatchNorm2d(6, affine=False),
    "eval-trained-affine": lambda: nn.BatchNorm2d(6).eval(),
    "eval-frozen": lambda: nn.BatchNorm2d(6).eval().requires_grad_(False),
}


@pytest.mark.parametrize("policy", ["factors", "input"])
@pytest.mark.parametrize("case", CASES)
def test_eps_one_equals_plain_autograd(case, policy):
    model = block(CASES[case]())
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        model[1].running_mean.uniform_(-0.5, 0.5) if model[1].running_mean is not None else None
        model[1].running_var.uniform_(0.5, 2.0) if model[1].running_var is not None else None
        if model[1].weight is not None:
            model[1].weight.uniform_(0.5, 1.5)
            model[1].bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(model)
    actcomp.compress(model, eps=1.0, neighbours=actcomp.Neighbours(batchnorm=policy))
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):
        grads = []
        for m in (model, reference):
            m.zero_grad()
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.backward(torch.cos(y.detach()))
            grads.append((y.detach(), xi.grad, [p.grad for p in m.parameters() if p.requires_grad]))
        (y, gx, gp), (y_ref, gx_ref, gp_ref) = grads
        assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
        assert torch.allclose(gx, gx_ref, rtol=1e-9, atol=1e-12)
        assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(gp, gp_ref))
        for a, b in zip(model[1].buffers(), reference[1].buffers()):
            assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-14)


def test_frozen_eval_batchnorm_keeps_nothing_of_its_input():
    model = block(nn.BatchNorm2d(6).eval().requires_grad_(False))
    actcomp.compress(model, eps=0.9)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64).requires_grad_()
    report = actcomp.measure(model, x)
    row = next(r for r in report.rows if r.name == "1")
    assert row.kind == "neighbour" and row.policy == "nothing"
    assert row.saved_bytes == 2 * 6 * 8  # mean and 1/sigma per channel
    assert row.vanilla_saved_bytes >= 5 * 6 * 8 * 8 * 8


def test_training_batchnorm_keeps_factors_or_its_input():
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64).cumsum(3).requires_grad_()
    model = block(nn.BatchNorm2d(6))
    actcomp.compress(model, eps=0.8)
    report = actcomp.measure(model, x)
    row = next(r for r in report.rows if r.name == "1")
    assert row.policy == "factors" and row.saved_bytes < row.vanilla_saved_bytes / 2
    actcomp.compress(model, eps=0.8, neighbours=actcomp.Neighbours(batchnorm="input"))
    row = next(r for r in actcomp.measure(model, x).rows if r.name == "1")
    assert row.policy == "factors" and row.saved_bytes < row.vanilla_saved_bytes / 2
    actcomp.compress(model, eps=0.8, neighbours=actcomp.Neighbours(batchnorm="keep"))
    row = next(r for r in actcomp.measure(model, x).rows if r.name == "1")
    assert row.policy == "plain" and row.saved_bytes == row.vanilla_saved_bytes


def test_batchnorm_before_the_first_compressed_layer_stays_exact():
    """Approximate policies start after the first compressed layer: an earlier BatchNorm
    that trains is left to plain autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    actcomp.compress(model, ["1"], eps=0.8)
    assert not actcomp.layer_state(model[0]).approximate and actcomp.layer_state(model[2]).approximate
    x = torch.randn(4, 3, 8, 8).requires_grad_()
    rows = {r.name: r for r in actcomp.measure(model, x).rows}
    assert rows["0"].policy == "plain" and rows["2"].policy == "factors"


def test_training_batchnorm_holds_at_most_two_tensors_of_its_input_size():
    """Forward: x_hat is factored and dropped before the output exists; backward: dX is
    written into the rebuilt x_hat's buffer. Beyond x and dY, each pass allocates at most about
    two tensors of the input's size at once (plain torch's CPU backward holds three)."""
    from actcomp.memory.measure import _peak_of

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.BatchNorm2d(16))
    actcomp.compress(model, eps=0.9)
    x = torch.nn.functional.interpolate(torch.randn(16, 4, 5, 5), size=96, mode="bilinear")
    h = model[0](x).detach().requires_grad_()  # the BatchNorm's input (its backward alone is measured)
    size = h.numel() * h.element_size()
    out = {}
    peak, _ = _peak_of(lambda: out.setdefault("y", model[1](h)), torch.device("cpu"))
    if peak is None:
        pytest.skip("this torch's profiler has no allocation events")
    assert actcomp.layer_state(model[1]).last.method == "factors"
    assert peak < 2.2 * size  # x_hat, the first factorisation step; then the output
    dy = torch.randn_like(out["y"])
    peak, _ = _peak_of(lambda: out["y"].backward(dy), torch.device("cpu"))
    assert peak < 1.5 * size  # x_hat, which becomes dX


@pytest.mark.parametrize("policy", ["factors", "input"])
def test_what_batchnorm_factors_is_not_held_past_its_own_forward(policy):
    """x_hat (or the detached input) is BatchNorm's own temporary: it must not enter the cache of
    shared factors, which holds a tensor without grad_fn until the forward ends (every x_hat of
    the model alive at once: on the demo's model the step's peak doubled)."""
    from actcomp.core import state as core_state

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
    ).double()
    actcomp.compress(model, eps=0.9, neighbours=actcomp.Neighbours(batchnorm=policy))
    held = []  # entries each BatchNorm's forward added to the cache of leaves
    for bn in (model[1], model[4]):
        bn.register_forward_pre_hook(lambda *_: held.append(-len(core_state._SCOPE.leaves)))
        bn.register_forward_hook(lambda *_: held.append(held.pop() + len(core_state._SCOPE.leaves)))
    model(torch.randn(4, 3, 8, 8, dtype=torch.float64)).sum().backward()
    assert held == [0, 0]
    assert actcomp.layer_state(model[4]).stats().method == "factors"
