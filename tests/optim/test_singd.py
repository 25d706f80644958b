"""actcomp.optim.SINGD: stock singd's steps on the reconstructed input, from the factors, with
the raw input never kept; stock behaviour on plain layers; a clear error without singd."""

import copy
import gc
import sys
import weakref

import pytest
import torch
from torch import nn

import actcomp
from actcomp.attach import layer_state
from optim_cases import record_reconstructions

STRUCTURES = ["dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz", "triutoeplitz"]

# (name, layer factory, input shape): dims above 30 so that every structure has its blocks
LAYERS = [
    ("linear", lambda: nn.Linear(36, 33), (16, 36)),
    ("linear-3d", lambda: nn.Linear(34, 31, bias=False), (4, 5, 34)),
    ("conv", lambda: nn.Conv2d(4, 32, 3, stride=2, padding=1), (6, 4, 9, 9)),
    ("conv-grouped", lambda: nn.Conv2d(8, 32, 3, dilation=2, padding=2, groups=2, bias=False), (5, 8, 8, 7)),
]


def linear_loss(y, weights):
    """A loss linear in the output, averaged over the batch: dY = weights / B whatever W is."""
    return (y * weights).sum() / y.shape[0]


def run(optimizer_cls, layer, x, steps, **kwargs):
    """Steps of an optimizer on one layer fed a fixed input, with a linear loss."""
    torch.manual_seed(1)
    weights = torch.randn_like(layer(x))
    optimizer = optimizer_cls(layer, lr=0.1, T=1, **kwargs)
    for _ in range(steps):
        optimizer.zero_grad()
        linear_loss(layer(x), weights).backward()
        optimizer.step()
    return optimizer


# singd 0.0.5's structures other than dense and diagonal refuse float64 (its
# structures.utils.lowest_precision), ours as stock's: they are checked in float32; the root
# they are fed is checked in float64 for every layer in test_roots.py.
PRECISIONS = [pytest.param(s, torch.float64, 1e-12, id=f"{s}-float64") for s in ("dense", "diagonal")] + [
    pytest.param(s, torch.float32, 1e-5, id=f"{s}-float32") for s in STRUCTURES
]


@pytest.mark.filterwarnings("ignore:Calling naive implementation")
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("layer_case", LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize("structure, dtype, tol", PRECISIONS)
def test_three_steps_equal_stock_singd_on_the_reconstruction(structure, dtype, tol, layer_case, approx):
    singd = pytest.importorskip("singd.optim.optimizer")
    from actcomp.optim import SINGD

    _, make, shape = layer_case
    torch.manual_seed(0)
    plain = make().to(dtype)
    initial = plain.weight.detach().clone()
    compressed = actcomp.compress(copy.deepcopy(plain), method="hosvd", eps=0.8)
    x = torch.randn(*shape, dtype=dtype)
    seen = record_reconstructions(compressed)
    options = dict(structures=(structure, structure), kfac_approx=approx)
    run(SINGD, compressed, x, 3, **options)
    assert len(seen) == 3 and all(torch.equal(seen[0], s) for s in seen)  # the same factors each step
    run(singd.SINGD, plain, seen[0], 3, **options)
    for ours, stock in zip(compressed.parameters(), plain.parameters()):
        torch.testing.assert_close(ours, stock, rtol=tol, atol=tol)
    assert (compressed.weight - initial).abs().max() > 1e-3  # the steps moved the weights


def test_plain_layers_step_exactly_as_stock():
    """No compressed layer, or every layer suspended: the stock hooks, bit for bit."""
    singd = pytest.importorskip("singd.optim.optimizer")
    from actcomp.optim import SINGD

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 4))
    x, target = torch.randn(6, 3, 7, 7), torch.randint(0, 4, (6,))
    twins = [copy.deepcopy(model) for _ in range(3)]
    actcomp.compress(twins[2], method="hosvd", eps=0.8)
    for optimizer_cls, net in ((SINGD, twins[0]), (singd.SINGD, twins[1]), (SINGD, twins[2])):
        optimizer = optimizer_cls(net, lr=0.05, T=2)
        for _ in range(3):
            optimizer.zero_grad()
            with actcomp.suspended(net):
                nn.functional.cross_entropy(net(x), target).backward()
            optimizer.step()
    for a, b, c in zip(*(t.parameters() for t in twins)):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_raw_input_is_dead_after_forward():
    """Ours keeps nothing of the compressed layer's input; stock singd keeps it until backward."""
    singd = pytest.importorskip("singd.optim.optimizer")
    from actcomp.optim import SINGD

    for optimizer_cls, kept in ((SINGD, False), (singd.SINGD, True)):
        torch.manual_seed(0)
        model = actcomp.compress(nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)), method="hosvd", eps=0.9)
        optimizer = optimizer_cls(model, T=1)
        x = torch.randn(8, 2) @ torch.randn(2, 12)  # low rank: its factors are smaller than x, so x is not kept
        ref = weakref.ref(x)
        loss = model(x).square().mean()
        del x
        gc.collect()
        assert (ref() is not None) == kept
        loss.backward()
        optimizer.step()


def test_remove_hooks_detaches_observers_and_hooks():
    pytest.importorskip("singd")
    from actcomp.optim import SINGD

    model = actcomp.compress(nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2)), method="svd", eps=0.9)
    optimizer = SINGD(model, T=1)
    model(torch.randn(3, 5)).sum().backward()
    assert all(len(layer_state(m).observers) == 1 for m in model)
    optimizer.remove_hooks()
    assert all(not layer_state(m).observers and not m._forward_hooks for m in model)


def test_gradient_filter_conv_is_refused_by_layer_name():
    pytest.importorskip("singd")
    from actcomp.optim import SINGD

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    actcomp.compress(model, config=actcomp.CompressionConfig("gradient_filter", patch=2))
    optimizer = SINGD(model, T=1)
    with pytest.raises(TypeError, match=r"layer '0' \(Conv2d\).*gradient_filter"):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.remove_hooks()


def test_missing_singd_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "singd" or m.startswith("singd.")] + ["actcomp.optim.singd"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "singd", None)
    with pytest.raises(ImportError, match=r"actcomp\[singd\]"):
        from actcomp.optim import SINGD  # noqa: F401


@pytest.mark.filterwarnings("ignore:Calling naive implementation")
@pytest.mark.parametrize("structure", STRUCTURES)
def test_state_dict_loads_with_weights_only_and_resumes_exactly(structure, tmp_path):
    """The state dict is plain data: saved, loaded with weights_only=True into a new
    optimizer, it continues exactly as the uninterrupted run."""
    pytest.importorskip("singd")
    from actcomp.optim import SINGD

    torch.manual_seed(0)
    model = actcomp.compress(nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 31)), method="hosvd", eps=0.9)
    twin = copy.deepcopy(model)
    x, target = torch.randn(4, 3, 6, 6), torch.randint(0, 31, (4,))
    options = dict(lr=0.05, T=2, structures=(structure, structure))

    def train(net, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), target).backward()
            optimizer.step()

    train(model, SINGD(model, **options), 5)
    first = SINGD(twin, **options)
    train(twin, first, 3)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    first.remove_hooks()
    second = SINGD(twin, **options)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    train(twin, second, 2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
