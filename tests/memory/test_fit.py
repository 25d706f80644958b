"""fit(): the measured device total of a step within a budget, exact levers first, calibration
without side effects, batches as users hold them."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.core.batch import batch_bytes, step_loss
from actcomp.memory.fit import BudgetExceededError


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU()),
        nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU()),
        nn.Linear(128, 10),
    ).double()


def data(n: int = 512):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 32, generator=generator, dtype=torch.float64), torch.randint(0, 10, (n,), generator=generator)


def plain_total(model, x, y) -> int:
    """The device total of the plain step, as fit measures it (on a copy)."""
    model = copy.deepcopy(model)
    return actcomp.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), "1GiB", (x, y), F.cross_entropy).report.plain.total_bytes


def plain_steps(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_fitted_steps_are_plain_momentum_steps(step, model, reference, batches, budget, tol):
    """The fitted step on ``batches`` stays within ``budget`` (measured) and leaves the weights
    of plain SGD with momentum on a copy; remove() leaves no compressed layer behind."""
    for xb, yb in batches:
        step(xb, yb)
    assert step.report.measured_total_bytes is not None and step.report.measured_total_bytes <= budget
    plain_steps(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), batches)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol / 10)
    step.remove()
    assert not actcomp.compressed_layers(model)


def test_budget_above_plain_is_the_plain_step():
    model, (x, y) = mlp(), data()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = actcomp.fit(model, optimizer, "1GiB", (x, y), F.cross_entropy)
    assert step.report.chosen.describe() == "plain" and step.report.chosen == step.report.plain
    batches = [data(512), data(512)]
    for xb, yb in batches:
        step(xb, yb)
    plain_steps(reference, torch.optim.Adam(reference.parameters(), lr=1e-2), batches)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_calibration_leaves_model_and_optimizer_as_they_were():
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    plain_steps(model, optimizer, [(x, y)])  # the optimizer has state
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    total = actcomp.fit(model, optimizer, "1GiB", (x, y), F.cross_entropy).report.plain.total_bytes
    actcomp.fit(model, optimizer, int(total * 0.8), (x, y), F.cross_entropy)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key])
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    after = optimizer.state_dict()
    for index, values in state["state"].items():
        for name, value in values.items():
            assert torch.equal(after["state"][index][name], value)


@pytest.mark.parametrize("fraction", [0.9, 0.75])
def test_a_tighter_budget_is_met_by_exact_levers_with_the_plain_weights(fraction):
    model, (x, y) = mlp(), data()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = plain_total(model, x, y)
    budget = int(total * fraction)
    step = actcomp.fit(model, optimizer, budget, (x, y), F.cross_entropy, allow=("micro_batches", "recompute", "step_in_backward"))
    chosen = step.report.chosen
    assert chosen.exact and chosen.total_bytes <= budget and chosen.describe() != "plain"
    assert_fitted_steps_are_plain_momentum_steps(step, model, reference, [data(512), data(512), data(512)], budget, tol=1e-10)


def test_an_optimizer_of_another_model_is_refused():
    model, other, (x, y) = mlp(), mlp(), data()
    with pytest.raises(ValueError, match="the model's own optimizer"):
        actcomp.fit(model, torch.optim.SGD(other.parameters(), lr=0.1), "1GiB", (x, y), F.cross_entropy)


def test_infeasible_budget_names_the_smallest_total():
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"smallest total measured is .* resident .*weights"):
        actcomp.fit(model, optimizer, "4KiB", (x, y), F.cross_entropy, allow=("micro_batches",))


def test_compression_is_used_only_within_max_error():
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    total = plain_total(model, x, y)
    step = actcomp.fit(model, optimizer, int(total * 0.97), (x, y), F.cross_entropy, allow=("compression",), max_error=1.0, headroom=0.0)
    chosen = step.report.chosen
    assert chosen.compression is not None and chosen.grad_error > 0
    # what max_error bounds for compression: the median layer bias over the batch in 8 chunks
    assert chosen.grad_bias is not None and chosen.bounded_error == chosen.grad_bias <= 1.0
    assert actcomp.compressed_layers(model)
    other = mlp()
    with pytest.raises(ValueError, match="max_error"):
        actcomp.fit(other, torch.optim.SGD(other.parameters(), lr=0.1), int(total * 0.97), (x, y), F.cross_entropy, allow=("compression",), max_error=0.0)


def test_batchnorm_micro_batches_are_exact_when_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 5)).double()
    x, y = torch.randn(16, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (16,))
    total = plain_total(model, x, y)

    def fitted(**settings):
        copied = copy.deepcopy(model)
        optimizer = torch.optim.SGD(copied.parameters(), lr=0.1)
        return actcomp.fit(copied, optimizer, int(total * 0.8), (x, y), F.cross_entropy, allow=("micro_batches",), max_error=0.0, **settings)

    frozen = fitted(freeze_batchnorm=True)
    assert frozen.report.chosen.micro_batches > 1 and frozen.report.chosen.grad_error == 0.0
    with pytest.raises(ValueError, match="max_error 0") as raised:  # in train mode micro-batches change BatchNorm's statistics
        fitted()
    assert "fits at" in str(raised.value) and "freeze_batchnorm=True makes them exact" in str(raised.value)


class ReturnsLoss(nn.Module):
    """A Hugging Face-style model: keyword batch in, an output with .loss out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 50))

    def forward(self, input_ids, labels):
        logits = self.body(self.embed(input_ids))
        return SimpleNamespace(loss=F.cross_entropy(logits.flatten(0, 1), labels.flatten()), logits=logits)


def test_dict_batches_and_outputs_with_loss():
    torch.manual_seed(0)
    model = ReturnsLoss()
    ids = torch.randint(0, 50, (16, 12))
    batch = {"input_ids": ids, "labels": ids}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = actcomp.fit(model, optimizer, "1GiB", batch)
    loss = step(**batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert float(step(batch)) < float(loss) + 1.0
    assert batch_bytes(batch) == 2 * ids.numel() * ids.element_size()
    assert torch.equal(step_loss(model, batch, None), model(**batch).loss)


def test_a_larger_batch_than_calibrated_is_reported_over_budget():
    model, (x, y) = mlp(), data(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    total = plain_total(model, x, y)
    step = actcomp.fit(model, optimizer, int(total * 1.05), (x, y), F.cross_entropy)
    big_x, big_y = data(1024)
    with pytest.raises(BudgetExceededError, match="exceeds the budget"):
        step(big_x, big_y)


@pytest.mark.parametrize("bad", [dict(headroom=1.0), dict(max_error=-1), dict(allow=("teleport",)), dict(budget="lots")])
def test_bad_settings_are_clear_errors(bad):
    model, (x, y) = mlp(), data()
    settings = dict(budget="1GiB") | bad
    with pytest.raises(ValueError):
        actcomp.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), batch=(x, y), loss_fn=F.cross_entropy, **settings)


def test_the_measured_step_is_the_first_with_the_optimizer_state_in_place():
    """Adam creates its state in its first step: that step is not the one checked (its state
    is already counted as resident), the next one is, and it stays within the budget."""
    model, (x, y) = mlp(), data()
    total = plain_total(model, x, y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = actcomp.fit(model, optimizer, int(total * 1.6), (x, y), F.cross_entropy)  # Adam's state is resident
    step(x, y)
    assert step.report.measured_total_bytes is None and optimizer.state
    step(x, y)
    assert step.report.measured_total_bytes is not None
    assert step.report.measured_total_bytes <= step.report.budget_bytes


def test_every_micro_batch_count_is_tried_in_order_until_one_fits():
    # with the step in backward one micro-batch can fit where two do not (the gradients all
    # accumulate before the last chunk's backward): a search assuming monotone totals misses it
    from actcomp.memory.fit import FitChoice, _fewest_fitting

    totals = {1: 190, 2: 205, 4: 200, 8: 193}
    tried = []

    def measure(k):
        tried.append(k)
        return FitChoice(k, (), True, None, totals[k], totals[k], 1.0, 0.0)

    assert _fewest_fitting(measure, [1, 2, 4, 8], 191).micro_batches == 1 and tried == [1]
    tried.clear()
    assert _fewest_fitting(measure, [1, 2, 4, 8], 196).micro_batches == 1
    assert _fewest_fitting(lambda k: None if k == 2 else measure(k), [2, 4, 8], 195).micro_batches == 8
    assert _fewest_fitting(measure, [1, 2, 4, 8], 100) is None


def test_micro_batch_counts_that_cannot_run_are_skipped_and_reported():
    # one-sample chunks through a train-mode BatchNorm raise in torch ("Expected more than 1
    # value per channel"): fit skips that count, says so, and still fits with another lever
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).double()
    x, y = torch.randn(4, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    total = plain_total(model, x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="smallest total measured"):
        actcomp.fit(model, optimizer, int(total * 0.5), (x, y), F.cross_entropy, allow=("micro_batches",), max_error=10.0)
    step = actcomp.fit(model, optimizer, int(total * 0.999), (x, y), F.cross_entropy, allow=("micro_batches", "step_in_backward"), max_error=10.0)
    notes = " ".join(step.report.notes)
    assert "4 micro-batches" in notes and "cannot run" in notes and "value per channel" in notes
    assert step.report.chosen.micro_batches < 4


def test_bf16_state_is_opt_in_and_counted_as_held():
    model, (x, y) = mlp().float(), data(64)
    x = x.float()
    other = copy.deepcopy(model)
    total = actcomp.fit(other, torch.optim.Adam(other.parameters(), lr=1e-3), "1GiB", (x, y), F.cross_entropy).report.plain.total_bytes
    other = copy.deepcopy(model)
    exact = actcomp.fit(other, torch.optim.Adam(other.parameters(), lr=1e-3), int(total * 0.999), (x, y), F.cross_entropy, allow=("step_in_backward",))
    assert all(c.state_dtype is None for c in exact.report.candidates)  # bf16 state is not taken unless allowed
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    allow = ("step_in_backward", "bf16_state")
    step = actcomp.fit(model, optimizer, int(total * 0.999), (x, y), F.cross_entropy, allow=allow)
    by_dtype = {c.state_dtype: c for c in step.report.candidates if c.step_in_backward}
    weights = step.report.weights_bytes
    # Adam's two moments: 8 bytes per float32 weight in full precision, 4 in bfloat16 (the
    # resident part of the total; the peak holds one parameter's moments cast up while it steps)
    full, half = (by_dtype[d].total_bytes - by_dtype[d].peak_bytes for d in (None, torch.bfloat16))
    assert full - half == weights
    assert not by_dtype[torch.bfloat16].exact and "state bfloat16" in by_dtype[torch.bfloat16].describe()
    with pytest.raises(ValueError, match="known"):
        actcomp.fit(model, optimizer, "1GiB", (x, y), F.cross_entropy, allow=("fp8_state",))


def test_measured_steps_on_other_batches_stay_within_the_budget():
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    budget = int(plain_total(model, x, y) * 0.8)
    step = actcomp.fit(model, optimizer, budget, (x, y), F.cross_entropy, allow=("micro_batches", "recompute", "step_in_backward"))
    generator = torch.Generator().manual_seed(7)
    totals = []
    for _ in range(4):
        xb = torch.randn(512, 32, generator=generator, dtype=torch.float64)
        loss, total = step.measured(xb, torch.randint(0, 10, (512,), generator=generator))
        assert loss.ndim == 0 and not loss.requires_grad
        totals.append(total)
    assert all(t is not None and 0 < t <= budget for t in totals)
    with pytest.raises(TypeError, match="positional or as keyword"):
        step.measured(x, y=y)


def test_compression_with_recompute_compresses_only_the_layers_outside_the_blocks():
    from actcomp.memory.fit import FitChoice, _Applied

    model, (x, y) = mlp(), data(64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    choice = FitChoice(1, ("0",), False, actcomp.CompressionConfig("hosvd", 0.9), 0, 0, 0.0, 0.0)
    applied = _Applied(model, optimizer, choice, F.cross_entropy, (x, y), False)
    assert sorted(actcomp.compressed_layers(model)) == ["1.0", "1.2", "2"]
    assert "hosvd eps 0.9 outside them" in choice.describe()
    applied.step((x, y))
    applied.remove()
    assert not actcomp.compressed_layers(model)


def test_optimizer_state_dict_resumes_the_step_in_backward_exactly():
    model, (x, y) = mlp(), data(256)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = actcomp.fit(model, optimizer, "1GiB", (x, y), F.cross_entropy)
    assert step.report.chosen.describe() == "plain"
    step.remove()
    from actcomp.memory.fit import FitChoice, FittedStep, _Applied

    choice = FitChoice(1, (), True, None, 0, 0, 0.0, 0.0)
    fitted = FittedStep(_Applied(model, optimizer, choice, F.cross_entropy, (x, y), False), step.report)
    batches = [data(256) for _ in range(3)]
    for xb, yb in batches[:2]:
        fitted(xb, yb)
    saved = copy.deepcopy(fitted.optimizer_state_dict())
    fitted.remove()
    resumed = torch.optim.Adam(model.parameters(), lr=1e-2)
    resumed.load_state_dict(saved)
    again = FittedStep(_Applied(model, resumed, choice, F.cross_entropy, (x, y), False), step.report)
    again(*batches[2])
    plain_steps(reference, torch.optim.Adam(reference.parameters(), lr=1e-2), batches)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_given_levers_skip_the_search_and_round_trip_through_json():
    import json

    from actcomp.memory.fit import FitChoice

    choice = FitChoice(4, ("0", "1"), True, actcomp.CompressionConfig("hosvd", 0.95), 0, 0, 0.0, 0.0, torch.bfloat16)
    assert FitChoice.from_levers(json.loads(json.dumps(choice.levers()))) == choice
    for bad in ({}, {"micro_batches": 2}, {**choice.levers(), "state_dtype": "int8"}):
        with pytest.raises(ValueError):
            FitChoice.from_levers(bad)
    model, (x, y) = mlp(), data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    levers = {"micro_batches": 2, "recompute": [], "step_in_backward": True, "compression": None, "state_dtype": None}
    step = actcomp.fit(model, optimizer, "1GiB", (x, y), F.cross_entropy, levers=levers)
    assert step.report.chosen.describe() == "2 micro-batches, step in backward"
    assert {c.describe() for c in step.report.candidates} == {"plain", "2 micro-batches, step in backward"}
    step.remove()
    with pytest.raises(ValueError, match="given levers"):
        actcomp.fit(model, optimizer, "4KiB", (x, y), F.cross_entropy, levers=levers)


def test_the_gradient_error_of_compression_outside_recompute_is_its_own():
    from actcomp.memory.fit import _Calibration

    model, (x, y) = mlp(), data(64)
    calibration = _Calibration(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), F.cross_entropy, 1, False)
    config = actcomp.CompressionConfig("hosvd", 0.5)
    everywhere = calibration.measure(1, (), False, config)
    outside = calibration.measure(1, ("0", "1"), False, config)  # only the head is compressed
    assert everywhere.grad_error > outside.grad_error  # not the cached error of compressing every layer
    assert calibration.measure(1, ("0", "1"), False, None).grad_error == 0.0


def relu_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).double()


def test_exact_policies_fit_with_the_plain_weights():
    """Bit masks for ReLU, uint8 indices for max-pool, nothing for the average pool: fewer bytes
    than plain autograd with no gradient error; the weights after steps are the plain loop's."""
    model = relu_cnn()
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(32, 3, 16, 16, generator=generator, dtype=torch.float64), torch.randint(0, 10, (32,), generator=generator)) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = plain_total(model, *batches[0])
    budget = int(total * 0.9)
    step = actcomp.fit(model, optimizer, budget, batches[0], F.cross_entropy, allow=("exact_policies",), max_error=0.0)
    chosen = step.report.chosen
    assert chosen.compression == actcomp.EXACT_POLICIES and chosen.exact and chosen.grad_error == 0.0
    assert chosen.describe() == "exact policies" and chosen.total_bytes <= budget
    assert_fitted_steps_are_plain_momentum_steps(step, model, reference, batches, budget, tol=1e-12)


def test_exact_policies_are_tried_only_below_the_micro_batches_found_without_them():
    model = relu_cnn()
    generator = torch.Generator().manual_seed(2)
    batch = (torch.randn(32, 3, 16, 16, generator=generator, dtype=torch.float64), torch.randint(0, 10, (32,), generator=generator))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    total = plain_total(model, *batch)
    report = actcomp.fit(
        model, optimizer, int(total * 0.6), batch, F.cross_entropy, allow=("micro_batches", "exact_policies"), freeze_batchnorm=True
    ).report
    without = [c for c in report.candidates if c.compression is None and report.fits(c)]
    found = min(c.micro_batches for c in without)
    assert found > 1
    tried = [c.micro_batches for c in report.candidates if c.compression == actcomp.EXACT_POLICIES]
    assert tried and max(tried) < found
    assert report.chosen.exact


def test_the_layer_bias_bounds_compression_and_a_small_batch_falls_back_to_the_relative_error():
    """fit's bound on compression is the median layer bias (memory/error.py) measured over the
    batch in chunks against plain on the same chunks; a batch too small to split in two chunks
    of two samples per micro-batch is bounded by one batch's relative error instead."""
    from actcomp.memory.error import median_layer_bias
    from actcomp.memory.fit import _Calibration

    model, (x, y) = mlp(), data(64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = actcomp.CompressionConfig("hosvd", 0.9)
    calibration = _Calibration(model, optimizer, (x, y), F.cross_entropy, 1, False)
    choice = calibration.measure(1, (), False, config)
    compressed = actcomp.compress(copy.deepcopy(model), "all", config=config, sample=x)
    assert choice.grad_bias == pytest.approx(median_layer_bias(model, compressed, (x, y), F.cross_entropy, chunks=8), rel=1e-9)
    assert choice.bounded_error == choice.grad_bias and choice.grad_error > 0
    small = _Calibration(model, optimizer, (x[:3], y[:3]), F.cross_entropy, 1, False).measure(1, (), False, config)
    assert small.grad_bias is None and small.bounded_error == small.grad_error > 0


class StemNet(nn.Module):
    """A ResNet-like model: a stem called child by child in forward (a region, not a block), then
    a Sequential of blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer = nn.Sequential(*[nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()) for _ in range(2)])
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layer(x), 1), 1))


def test_recompute_covers_the_stem_region_with_the_plain_weights():
    """fit measures recompute of the blocks alone and with the stem region; at a budget only the
    region meets, it recomputes the region too, and the steps are plain momentum steps."""
    from actcomp.memory.fit import _Calibration, _recompute_sets

    model = StemNet().double()
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 3, 32, 32, generator=generator, dtype=torch.float64), torch.randint(0, 10, (16,), generator=generator)) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calibration = _Calibration(model, optimizer, batches[0], F.cross_entropy, 1, False)
    blocks = ("layer.0", "layer.1")
    assert _recompute_sets(calibration) == [(), blocks, (*blocks, "conv1+bn1+relu+maxpool")]
    without, with_region = (calibration.measure(1, r, False, None).total_bytes for r in _recompute_sets(calibration)[1:])
    assert with_region < without
    step = actcomp.fit(model, optimizer, with_region, batches[0], F.cross_entropy, allow=("recompute",), max_error=0.0)
    chosen = step.report.chosen
    assert chosen.recompute == (*blocks, "conv1+bn1+relu+maxpool")
    assert chosen.describe() == "recompute 2 blocks + 1 region"
    assert_fitted_steps_are_plain_momentum_steps(step, model, reference, batches, with_region, tol=1e-12)
    assert "forward" not in model.__dict__ and "forward" not in model.conv1.__dict__


def test_exact_policies_leave_the_modules_of_a_recomputed_region_plain():
    """Inside a recomputed region nothing is kept: its modules run plain (no mask or index
    policy adding work to the recompute); blocks and the rest keep their neighbour policies."""
    from actcomp.attach.swap import layer_state
    from actcomp.memory.fit import FitChoice, _Applied

    model, (x, y) = StemNet().double(), (torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (8,)))
    recompute = ("layer.0", "conv1+bn1+relu+maxpool")
    choice = FitChoice(1, recompute, False, actcomp.EXACT_POLICIES, 0, 0, 0.0, 0.0)
    applied = _Applied(model, torch.optim.SGD(model.parameters(), lr=0.1), choice, F.cross_entropy, (x, y), False)
    assert [layer_state(m) for m in (model.conv1, model.bn1, model.relu, model.maxpool)] == [None] * 4
    assert layer_state(model.layer[0][2]) is not None and layer_state(model.layer[1][2]) is not None
    applied.step((x, y))
    applied.remove()
    assert layer_state(model.layer[1][2]) is None and "forward" not in model.conv1.__dict__
