"""gradient_error_stats: the bias that stays after averaging over batches, the spread that
averages out, and plain's minibatch noise; checked on constructed errors and on the truncated
and unbiased methods."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.memory.error import GradientErrorStats, RunningError, calibration_gradients, gradient_error_stats, median_layer_bias, per_tensor_error_stats
from conftest import rel_err


def batches_of(n, size=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(size, generator=generator, dtype=torch.float64)
    return [[mean + 0.5 * torch.randn(size, generator=generator, dtype=torch.float64)] for _ in range(n)], mean


def test_a_constant_offset_is_all_bias():
    exact, _ = batches_of(6)
    offset = torch.linspace(-1, 1, 50, dtype=torch.float64)
    stats = gradient_error_stats([[g[0] + offset] for g in exact], exact)
    mean = torch.stack([g[0] for g in exact]).mean(0)
    assert stats.bias == pytest.approx(float(offset.norm() / mean.norm()), rel=1e-12)
    assert stats.spread == pytest.approx(0.0, abs=1e-12)
    deviations = torch.stack([g[0] for g in exact]) - mean
    assert stats.noise == pytest.approx(math.sqrt(float((deviations**2).sum()) / 5) / float(mean.norm()), rel=1e-12)
    assert stats.batches == 6


def test_zero_mean_noise_is_spread_not_bias():
    exact, mean = batches_of(400)
    generator = torch.Generator().manual_seed(7)
    noisy = [[g[0] + 2.0 * torch.randn(50, generator=generator, dtype=torch.float64)] for g in exact]
    stats = gradient_error_stats(noisy, exact)
    expected_spread = 2.0 * math.sqrt(50) / float(torch.stack([g[0] for g in exact]).mean(0).norm())
    assert stats.spread == pytest.approx(expected_spread, rel=0.05)
    assert stats.bias < 0.1 * stats.spread  # the mean's sampling error is removed, not counted as bias
    biased = gradient_error_stats([[g[0] + 0.3 * mean] for g in noisy], exact)
    assert biased.bias == pytest.approx(0.3, abs=0.05)


def test_learning_error_weighs_bias_by_the_horizon():
    stats = GradientErrorStats(bias=0.5, spread=1.0, noise=1.0, batches=8)
    assert stats.learning_error(10) == pytest.approx(math.sqrt(10 * 0.25 + 1.0))
    unbiased = GradientErrorStats(bias=0.0, spread=2.0, noise=1.0, batches=8)
    assert unbiased.learning_error(1) > stats.learning_error(1)  # one step: the spread is worse
    assert unbiased.learning_error(40) < stats.learning_error(40)  # over many steps the bias is
    assert GradientErrorStats(0.0, 0.0, 0.0, 2).learning_error() == 0.0
    assert GradientErrorStats(0.1, 0.0, 0.0, 2).learning_error() == math.inf


def test_missing_gradients_count_as_zero_and_bad_input_is_refused():
    exact = [[torch.ones(3), None], [torch.full((3,), 2.0), None]]
    estimates = [[torch.ones(3), torch.ones(2)], [torch.full((3,), 2.0), torch.ones(2)]]
    stats = gradient_error_stats(estimates, exact)
    assert stats.bias == pytest.approx(math.sqrt(2) / math.sqrt(3 * 1.5**2), rel=1e-9)
    with pytest.raises(ValueError, match=">= 2"):
        gradient_error_stats(estimates[:1], exact[:1])
    with pytest.raises(ValueError, match="parameter gradients"):
        gradient_error_stats([[torch.ones(3)]] * 2, exact)


def test_truncation_is_biased_and_the_sampled_method_is_not():
    """On a layer's real weight gradients over 60 batches: hosvd at eps 0.8 leaves a bias that
    averaging does not remove; hosvd_unbiased's error is spread with a bias near zero."""
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 4, 3, padding=1).double()
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(6, 7, 7, generator=generator, dtype=torch.float64)
    target = torch.randn(4, 7, 7, generator=generator, dtype=torch.float64)

    def batch():  # inputs and output gradients around a common mean, as a task's are
        x = F.relu(base + 0.7 * torch.randn(8, 6, 7, 7, generator=generator, dtype=torch.float64))
        return x, target + 0.5 * torch.randn(8, 4, 7, 7, generator=generator, dtype=torch.float64)

    data = [batch() for _ in range(60)]

    def grads(model):
        out = []
        for x, dy in data:
            model.zero_grad()
            model(x).backward(dy)
            out.append([model.weight.grad.clone()])
        return out

    exact = grads(layer)
    results = {}
    for method in ("hosvd", "hosvd_unbiased"):
        model = nn.Conv2d(6, 4, 3, padding=1).double()
        model.load_state_dict(layer.state_dict())
        actcomp.compress(model, config=actcomp.CompressionConfig(method, 0.8))
        results[method] = gradient_error_stats(grads(model), exact)
    assert results["hosvd"].bias > 4 * results["hosvd_unbiased"].bias
    assert results["hosvd_unbiased"].spread > results["hosvd"].spread


def test_per_tensor_stats_weigh_each_tensor_by_its_own_gradient():
    exact, _ = batches_of(5)
    small = [[g[0], 1e-3 * g[0]] for g in exact]
    mean = torch.stack([g[1] for g in small]).mean(0)
    estimates = [[g[0], g[1] + mean] for g in small]  # the small tensor off by its own mean gradient
    whole = gradient_error_stats(estimates, small)
    first, second = per_tensor_error_stats(estimates, small)
    assert first.bias == 0.0 and first.spread == 0.0
    assert second.bias == pytest.approx(1.0, rel=1e-9)  # 100% of its own gradient
    assert whole.bias < 2e-3  # invisible in the whole vector
    assert per_tensor_error_stats([[None]] * 2, [[None]] * 2) == [None]


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 3)).double()


def _batch(n=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,), generator=generator)


def test_calibration_gradients_at_eps_one_equal_the_exact_ones_and_leave_the_model_alone():
    model = _bn_model()
    before = copy.deepcopy(model.state_dict())
    estimates, exact = calibration_gradients(model, actcomp.CompressionConfig("hosvd", 1.0), _batch(), F.cross_entropy, chunks=4, micro_batches=2)
    assert len(estimates) == len(exact) == 4 and len(exact[0]) == len(list(model.parameters()))
    for est, ref in zip(estimates, exact):
        for a, b in zip(est, ref):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_chunks_of_one_batch_are_batches_and_the_exact_side_runs_the_same_micro_batches():
    model = _bn_model()
    x, y = _batch()
    config = actcomp.CompressionConfig("hosvd", 0.8)
    chunked = calibration_gradients(model, config, (x, y), F.cross_entropy, chunks=2, micro_batches=2)
    listed = calibration_gradients(model, config, [(x[:8], y[:8]), (x[8:], y[8:])], F.cross_entropy, micro_batches=2)
    for a, b in zip(sum(chunked[0] + chunked[1], []), sum(listed[0] + listed[1], [])):
        assert torch.equal(a, b)
    reference = copy.deepcopy(model)  # plain autograd on the same two micro-batches of the first chunk
    for xc, yc in ((x[:4], y[:4]), (x[4:8], y[4:8])):
        (F.cross_entropy(reference(xc), yc) * 0.5).backward()
    for a, p in zip(chunked[1][0], reference.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-10, atol=1e-13)
    assert rel_err(chunked[0][0][0], chunked[1][0][0]) > 1e-6  # eps 0.8 changes the conv's dW


def test_a_sampled_estimate_draws_anew_for_each_batch():
    model = _bn_model()
    x, y = _batch()
    estimates, exact = calibration_gradients(model, actcomp.CompressionConfig("hosvd_unbiased", 0.7), [(x, y)] * 3, F.cross_entropy)
    assert all(torch.equal(a, b) for a, b in zip(exact[0], exact[2]))
    assert rel_err(estimates[0][0], estimates[1][0]) > 1e-6


def test_calibration_gradients_need_two_batches():
    with pytest.raises(ValueError, match="at least 2 batches"):
        calibration_gradients(_bn_model(), actcomp.CompressionConfig("hosvd", 0.9), [_batch()], F.cross_entropy)


def test_median_layer_bias_is_zero_when_exact_and_tells_a_truncation_from_an_unbiased_draw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(24, 12, generator=generator, dtype=torch.float64).cumsum(1) / 3).relu()
    batch = (x, torch.randint(0, 3, (24,), generator=generator))
    assert median_layer_bias(model, actcomp.CompressionConfig("hosvd", 1.0), batch, F.cross_entropy, chunks=3) == 0.0
    truncated = median_layer_bias(model, actcomp.CompressionConfig("hosvd", 0.6), [batch] * 40, F.cross_entropy)
    unbiased = median_layer_bias(model, actcomp.CompressionConfig("hosvd_unbiased", 0.6), [batch] * 40, F.cross_entropy)
    assert truncated > 0.05 and unbiased < truncated / 3, (truncated, unbiased)


@pytest.mark.parametrize("offset_scale,noise_scale", [(0.0, 0.3), (0.4, 0.0), (0.2, 0.5)])
def test_running_error_equals_the_stats_of_the_kept_batches(offset_scale, noise_scale):
    exact, _ = batches_of(7, seed=3)
    generator = torch.Generator().manual_seed(4)
    offset = offset_scale * torch.linspace(-1, 1, 50, dtype=torch.float64)
    estimates = [[g[0] + offset + noise_scale * torch.randn(50, generator=generator, dtype=torch.float64)] for g in exact]
    running = RunningError()
    for est, ref in zip(estimates, exact):
        running.add(est[0].reshape(5, 10), ref[0].reshape(5, 10))  # any shape: flattened
    kept = gradient_error_stats(estimates, exact)
    assert running.count == 7
    assert running.bias == pytest.approx(kept.bias, rel=1e-9, abs=1e-12)
    assert running.spread == pytest.approx(kept.spread, rel=1e-9, abs=1e-12)
    assert running.averaged(4.0) == pytest.approx(math.sqrt(kept.bias**2 + kept.spread**2 / 4), rel=1e-9, abs=1e-12)


def test_running_error_of_exact_gradients_is_zero_and_needs_two_batches():
    running = RunningError()
    g = torch.randn(3, 4, dtype=torch.float64)
    running.add(g, g)
    with pytest.raises(ValueError, match="at least 2 batches, got 1"):
        running.averaged()
    running.add(2 * g, 2 * g)
    assert running.bias == running.spread == running.averaged() == 0.0
    zero, whole = RunningError(), torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
    for sign in (1, -1):  # the exact gradients average to zero, the errors are all 1
        zero.add(sign * whole + 1, sign * whole)
    assert zero.bias == math.inf and zero.spread == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        running.add(g, g.T)
