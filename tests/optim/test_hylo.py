"""actcomp.optim.HyLo: its step equals the dense damped natural-gradient solve on the
reconstructed input (all samples, KID and KIS reductions), the KIS weights are the reference
formula, the curvature is refreshed every update_freq steps, and no raw input is kept."""

import copy
import gc
import math
import weakref

import pytest
import torch
from torch import nn

import actcomp
from actcomp.optim import HyLo
from actcomp.optim.hylo import hybrid_mode, kis_probabilities
from actcomp.optim.samples import factor_samples
from actcomp.kernels.conv import ConvGeometry
from optim_cases import dense_rows, record_reconstructions

DT = torch.float64
LAYERS = [
    ("linear", lambda: nn.Linear(6, 4), (12, 6)),
    ("linear-3d", lambda: nn.Linear(5, 3, bias=False), (3, 4, 5)),
    ("conv", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (10, 3, 7, 7)),
    ("conv-grouped", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="reflect"), (9, 4, 6, 6)),
]
LAYER_IDS = [c[0] for c in LAYERS]


def dense_per_sample(x, layer, grad_out):
    """I (n x D) and G (n x C_out) of a layer from the full input and dY, by the definitions."""
    linear = isinstance(layer, nn.Linear)
    rows = dense_rows(x, layer, "expand" if linear else "reduce")
    inputs = rows * math.sqrt(rows.shape[0])
    b = grad_out.shape[0]
    grads = b * (grad_out.reshape(-1, grad_out.shape[-1]) if linear else grad_out.mean((2, 3)))
    return inputs, grads


def dense_update(inputs, grads, v, damping, selected=None, interpolation=None, count=None):
    """(F + lambda I)^-1 vec(V), F = (1/m) U_S W U_S^T from the dense per-sample gradients
    u_j = vec(G_j I_j^T), as a (C_out x D) matrix."""
    u = torch.einsum("no,nd->nod", grads, inputs).reshape(len(grads), -1).T  # (C_out*D, n)
    if selected is not None:
        u = u[:, selected]
    w = torch.eye(u.shape[1], dtype=DT) if interpolation is None else torch.eye(u.shape[1], dtype=DT) + interpolation @ interpolation.T
    fisher = u @ w @ u.T / (count if count is not None else u.shape[1])
    solution = torch.linalg.solve(fisher + damping * torch.eye(len(fisher), dtype=DT), v.reshape(-1))
    return solution.reshape(v.shape)


def one_step(layer, x, **kwargs):
    """One HyLo step (lr 1, no momentum) on a compressed copy: returns the direction taken,
    the reconstructed input, dY, the gradient V = [dW, db] and the optimizer."""
    compressed = actcomp.compress(copy.deepcopy(layer), method="hosvd", eps=0.8)
    seen = record_reconstructions(compressed)
    optimizer = HyLo(compressed, lr=1.0, momentum=0.0, update_freq=1, **kwargs)
    y = compressed(x)
    y.retain_grad()
    torch.manual_seed(3)
    weights = torch.randn_like(y)
    ((y * weights).sum() / y.shape[0]).backward()
    before = [p.detach().clone() for p in compressed.parameters()]
    grad = compressed.weight.grad.reshape(compressed.weight.shape[0], -1)
    if compressed.bias is not None:
        grad = torch.cat([grad, compressed.bias.grad.reshape(-1, 1)], dim=1)
    optimizer.step()
    step = [(b - p.detach()).reshape(p.shape[0], -1) for b, p in zip(before, compressed.parameters())]
    return torch.cat(step, dim=1), seen[0], y.grad, grad, optimizer


@pytest.mark.parametrize("mode", ["kid", "kis"])
@pytest.mark.parametrize("layer_case", LAYERS, ids=LAYER_IDS)
def test_full_rank_step_is_the_dense_damped_solve(layer_case, mode):
    _, make, shape = layer_case
    layer = make().to(DT)
    step, x_hat, grad_out, v, _ = one_step(layer, torch.randn(*shape, dtype=DT), damping=0.3, rank_ratio=1.0, mode=mode)
    inputs, grads = dense_per_sample(x_hat, layer, grad_out)
    torch.testing.assert_close(step, dense_update(inputs, grads, v, 0.3), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("layer_case", LAYERS, ids=LAYER_IDS)
def test_kid_step_is_the_dense_solve_with_the_interpolated_fisher(layer_case):
    """KID keeps the r samples of largest ||u_j||, interpolates the others from them
    (least squares on the kernel), F = (1/n) U_r (I + T T^T) U_r^T."""
    _, make, shape = layer_case
    layer = make().to(DT)
    step, x_hat, grad_out, v, optimizer = one_step(layer, torch.randn(*shape, dtype=DT), damping=0.3, rank_ratio=0.4, mode="kid")
    inputs, grads = dense_per_sample(x_hat, layer, grad_out)
    n = len(grads)
    r = max(1, int(0.4 * n))
    order = torch.argsort((inputs * inputs).sum(1) * (grads * grads).sum(1), descending=True)
    inputs, grads = inputs[order], grads[order]
    kernel = (inputs @ inputs.T) * (grads @ grads.T)
    t = torch.linalg.lstsq(kernel[:, :r], kernel[:, r:]).solution
    expected = dense_update(inputs, grads, v, 0.3, selected=torch.arange(r), interpolation=t, count=n)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-10)
    assert torch.equal(next(iter(optimizer.preconditioners.values())).index, order[:r])


@pytest.mark.parametrize("layer_case", LAYERS, ids=LAYER_IDS)
def test_kis_weights_and_step(layer_case):
    """KIS draws r samples with p_j = ||I_j||^2 ||G_j||^2 / sum (the reference formula) and
    uses F = (1/r) U_S U_S^T."""
    _, make, shape = layer_case
    layer = make().to(DT)
    step, x_hat, grad_out, v, optimizer = one_step(layer, torch.randn(*shape, dtype=DT), damping=0.3, rank_ratio=0.5, mode="kis")
    inputs, grads = dense_per_sample(x_hat, layer, grad_out)
    expected_weights = (inputs * inputs).sum(1) * (grads * grads).sum(1)
    expected_weights = expected_weights / expected_weights.sum()
    geometry = ConvGeometry.of(layer) if isinstance(layer, nn.Conv2d) else None
    family = "linear" if geometry is None else "conv"
    samples = factor_samples(family, actcomp.hosvd(x_hat, 1.0), geometry, layer.weight.shape, layer.bias is not None)
    torch.testing.assert_close(kis_probabilities(samples, grads), expected_weights, rtol=1e-12, atol=1e-14)
    index = next(iter(optimizer.preconditioners.values())).index
    assert len(index) == max(1, int(0.5 * len(grads))) and len(set(index.tolist())) == len(index)
    torch.testing.assert_close(step, dense_update(inputs, grads, v, 0.3, selected=index), rtol=1e-11, atol=1e-12)


def test_hybrid_switch():
    assert hybrid_mode(None, 3.0, 0.1) == "kid"
    assert hybrid_mode(3.0, 3.2, 0.1) == "kis"
    assert hybrid_mode(3.0, 4.0, 0.1) == "kid"
    assert hybrid_mode(3.0, 2.0, 0.1) == "kid"


def train(model, x, target, optimizer, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()


def small_net():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4))


@pytest.mark.parametrize("mode", ["kid", "kis", "hybrid"])
def test_plain_layers_equal_compressed_layers_on_the_reconstruction(mode):
    """A plain layer fed the reconstruction takes HyLo's steps of the compressed layer fed x
    (a loss linear in the output, so that dY is the same for both)."""
    torch.manual_seed(0)
    plain = nn.Linear(8, 5).to(DT)
    compressed = actcomp.compress(copy.deepcopy(plain), method="svd", eps=0.7)
    x, weights = torch.randn(16, 8, dtype=DT), torch.randn(16, 5, dtype=DT)
    seen = record_reconstructions(compressed)
    options = dict(lr=0.1, momentum=0.9, damping=0.5, update_freq=2, rank_ratio=0.5, mode=mode, weight_decay=1e-3)
    for layer, inputs in ((compressed, x), (plain, None)):
        optimizer = HyLo(layer, **options)
        for _ in range(4):
            optimizer.zero_grad()
            ((layer(x if inputs is not None else seen[0]) * weights).sum() / 16).backward()
            optimizer.step()
    for a, b in zip(compressed.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_update_frequency_and_damping_schedule():
    torch.manual_seed(0)
    model = actcomp.compress(small_net(), method="hosvd", eps=0.9)
    x, target = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    optimizer = HyLo(model, update_freq=3, damping=lambda step: 1.0 / (1 + step), mode="kis")
    kept = []
    for step in range(7):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        assert bool(optimizer._captured) == (step % 3 == 0)  # captured only on refresh steps
        optimizer.step()
        kept.append(dict(optimizer.preconditioners))
    for step in range(7):
        same = all(kept[step][n] is kept[step - step % 3][n] for n in kept[step])
        assert same and kept[step]["4"].damping == 1.0 / (1 + step - step % 3)
    assert kept[3]["4"] is not kept[2]["4"]


def test_raw_input_is_dead_and_factors_are_kept_instead():
    torch.manual_seed(0)
    model = actcomp.compress(nn.Sequential(nn.Linear(64, 10)), method="hosvd", eps=0.9)
    optimizer = HyLo(model, update_freq=1)
    x = torch.randn(32, 4) @ torch.randn(4, 64)  # rank 4: the batch factor has 4 columns
    ref = weakref.ref(x)
    loss = nn.functional.cross_entropy(model(x), torch.zeros(32, dtype=torch.long))
    del x
    gc.collect()
    assert ref() is None
    loss.backward()
    (captured,) = optimizer._captured.values()
    rank = actcomp.stats(model)["0"].ranks[0]
    assert rank <= 4 and captured.samples.left.shape == (32, rank + 1) and captured.samples.right.shape == (rank + 1, 65)
    assert captured.samples.nbytes < 32 * 65 * 4
    optimizer.step()


def test_state_dict_resumes_exactly(tmp_path):
    """Saved, loaded with weights_only=True into a new optimizer: the run continues exactly."""
    torch.manual_seed(0)
    x, target = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    model = actcomp.compress(small_net(), method="hosvd", eps=0.9)
    twin = copy.deepcopy(model)
    options = dict(update_freq=2, mode="hybrid", rank_ratio=0.5, lr=0.05)
    train(model, x, target, HyLo(model, **options), 5)
    first = HyLo(twin, **options)
    train(twin, x, target, first, 3)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    first.remove_hooks()
    second = HyLo(twin, **options)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    train(twin, x, target, second, 2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_missing_capture_names_the_layer():
    model = small_net()
    nn.functional.cross_entropy(model(torch.randn(2, 3, 6, 6)), torch.tensor([0, 1])).backward()
    optimizer = HyLo(model)
    with pytest.raises(RuntimeError, match="layer '0' \\(Conv2d\\)"):
        optimizer.step()


def test_bad_settings_are_refused():
    model = small_net()
    for kwargs, message in [(dict(mode="fast"), "mode"), (dict(rank_ratio=0), "rank_ratio"), (dict(damping=0), "damping"), (dict(update_freq=0), "update_freq")]:
        with pytest.raises(ValueError, match=message):
            HyLo(model, **kwargs)


def test_managed_layers_take_their_family_from_the_registry():
    """Each managed layer's statistics come from its registry family; a Linear subclass that
    overrides forward (not run by the registry) is still managed as the Linear it is."""
    from actcomp.kernels.conv import CONV
    from actcomp.kernels.linear import LINEAR

    class Doubled(nn.Linear):
        def forward(self, input):  # noqa: A002
            return super().forward(input) * 2

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), Doubled(4 * 4 * 4, 2))
    optimizer = HyLo(model, update_freq=1)
    assert optimizer.families == {model[0]: CONV, model[2]: LINEAR}
    train(model, torch.randn(2, 3, 6, 6), torch.tensor([0, 1]), optimizer, 1)
    assert set(optimizer.preconditioners) == {"0", "2"}
    optimizer.remove_hooks()
