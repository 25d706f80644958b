"""plan(): the applied plan keeps what it predicts, within budget; more budget, less error."""

import copy
import json

import pytest
import torch
from torch import nn

import actcomp
from actcomp.memory.error import RunningError
from actcomp.memory.plan import Plan, parse_bytes, plan
from actcomp.app.models import TinyMobileNet

LOSS = nn.functional.cross_entropy


def conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


MODELS = {
    "conv_net": (conv_net, (8, 3, 16, 16), 4, "all"),
    "tiny_mobilenet": (lambda: TinyMobileNet(4), (8, 1, 32, 32), 4, "last:5"),
}


def data(shape, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)


def measured_saved_bytes(model, batch):
    with actcomp.count_saved(model) as saved:
        LOSS(model(batch[0]), batch[1])
    return saved.saved_bytes


@pytest.mark.parametrize("name", list(MODELS))
def test_applied_plan_fits_and_error_falls_with_budget(name):
    build, shape, classes, candidates = MODELS[name]
    torch.manual_seed(0)
    model = build()
    batch = data(shape, classes)
    with pytest.raises(ValueError, match="is infeasible: training even one layer needs at least") as info:
        plan(model, [batch], budget=64, loss_fn=LOSS, candidates=candidates)
    smallest = int(str(info.value).split("(")[2].split(" bytes")[0])
    roomy = plan(model, [batch], budget=10**9, loss_fn=LOSS, candidates=candidates)
    largest = roomy.predicted_saved_bytes
    budgets = [smallest + int(f * (largest - smallest)) for f in (0.0, 0.1, 0.3, 0.6, 1.0)]
    errors = []
    for budget in budgets:
        p = plan(model, [batch], budget=budget, loss_fn=LOSS, candidates=candidates)
        applied = p.apply(copy.deepcopy(model))
        measured = measured_saved_bytes(applied, batch)
        assert measured == p.predicted_saved_bytes <= budget
        trained = {c.name for c in p.trained}
        for module_name, param in applied.named_parameters():
            assert param.requires_grad == (module_name.rsplit(".", 1)[0] in trained)
        errors.append(p.total_error)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_plan_is_not_applied_and_model_untouched():
    torch.manual_seed(0)
    model = conv_net()
    state = copy.deepcopy(model.state_dict())
    plan(model, [data((8, 3, 16, 16), 4)], budget="1MiB", loss_fn=LOSS)
    assert not actcomp.compressed_layers(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_json_round_trip_and_table(tmp_path):
    torch.manual_seed(0)
    p = plan(conv_net(), [data((8, 3, 16, 16), 4), data((8, 3, 16, 16), 4, seed=1)], budget="40KiB", loss_fn=LOSS, eps_grid=(0.6, 0.9))
    p.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == p
    assert "grad error" in p.table() and "budget 40.0 KiB" in p.table()
    assert all(c.eps in (None, 0.6, 0.9) for c in p.choices)


def test_step_scope_counts_weights_gradients_and_optimizer_state():
    torch.manual_seed(0)
    model = conv_net()
    batch = data((8, 3, 16, 16), 4)
    weights = sum(p.numel() * 4 for p in model.parameters())
    p = plan(model, [batch], budget=weights + 60_000, loss_fn=LOSS, scope="step", optimizer_copies=2)
    grads = sum(c.param_bytes for c in p.trained)
    assert p.predicted_bytes == weights + 3 * grads + p.predicted_saved_bytes <= weights + 60_000
    applied = p.apply(copy.deepcopy(model))
    assert measured_saved_bytes(applied, batch) == p.predicted_saved_bytes


def test_device_budget():
    torch.manual_seed(0)
    p = plan(conv_net(), [data((4, 3, 16, 16), 4)], device="stm32f746", loss_fn=LOSS)
    assert p.device == "stm32f746" and p.budget_bytes == actcomp.load_device("stm32f746").budget_bytes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of budget= or device="),
        ({"budget": 1, "device": "stm32h743"}, "exactly one of budget= or device="),
        ({"budget": "12 parsecs"}, "budget must be a number of bytes"),
        ({"device": "toaster"}, "unknown device 'toaster'"),
        # the eps methods are listed from the registry (each new one joins the list)
        ({"budget": "1MiB", "method": "none"}, r"needs method 'hosvd', 'asi', .*'svd'.*, got 'none'"),
        ({"budget": "1MiB", "method": "gradient_filter"}, r"needs method 'hosvd', 'asi', .*'syncfree'.*, got 'gradient_filter'"),
        ({"budget": "1MiB", "eps_grid": (0.5, 1.5)}, "eps must be a number in"),
        ({"budget": "1MiB", "scope": "everything"}, "scope must be"),
        ({"budget": "1MiB", "error": "bias"}, "error must be 'averaged' or 'relative'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(conv_net(), [data((4, 3, 16, 16), 4)], loss_fn=LOSS, **kwargs)


@pytest.mark.parametrize(
    "text, expected",
    [("512KiB", 524288), ("1.5MB", 1_500_000), ("2 GiB", 2 * 1024**3), ("100", 100), (4096, 4096), ("64kb", 64_000)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_asi_plan_keeps_what_it_predicts_on_the_first_step():
    torch.manual_seed(0)
    model = conv_net()
    batch = data((8, 3, 16, 16), 4)
    p = plan(model, [batch], budget="60KiB", loss_fn=LOSS, method="asi")
    applied = p.apply(copy.deepcopy(model))
    assert measured_saved_bytes(applied, batch) == p.predicted_saved_bytes <= 60 * 1024


@pytest.mark.parametrize("seed", range(20))
def test_pareto_knapsack_equals_brute_force(seed):
    """The exact multiple-choice knapsack against enumerating every combination."""
    import itertools
    import random

    from actcomp.memory.plan import Option, pareto_knapsack

    rng = random.Random(seed)
    items = [
        [Option(rng.randrange(0, 50), round(rng.random(), 3), (i, j)) for j in range(rng.randrange(1, 4))]
        for i in range(rng.randrange(1, 5))
    ]
    capacity = rng.randrange(0, 120)
    feasible = [
        (sum(o.error for o in combo), sum(o.nbytes for o in combo), tuple(o.key for o in combo))
        for combo in itertools.product(*items)
        if sum(o.nbytes for o in combo) <= capacity
    ]
    result = pareto_knapsack(items, capacity)
    if not feasible:
        assert result is None
        return
    best_error = min(f[0] for f in feasible)
    assert result is not None and abs(result.error - best_error) < 1e-9
    assert result.nbytes <= capacity
    chosen = [next(o for o in options if o.key == key) for options, key in zip(items, result.keys)]
    assert sum(o.nbytes for o in chosen) == result.nbytes and abs(sum(o.error for o in chosen) - result.error) < 1e-9
    assert result.nbytes == min(f[1] for f in feasible if abs(f[0] - best_error) < 1e-9)


def test_batchnorm_policies_are_chosen_by_the_budget(tmp_path):
    """A BatchNorm on batch statistics after the first trained layer is an item of the
    knapsack: kept plain (error 0) with room to spare, factors when the budget is tight."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    x = torch.nn.functional.interpolate(torch.randn(8, 3, 4, 4), size=16, mode="bilinear")
    batch = (x, torch.randint(0, 4, (8,)))
    roomy = plan(model, [batch], budget=10**9, loss_fn=LOSS, candidates="all")
    assert [n.name for n in roomy.neighbours] == ["2", "5"] and all(n.eps is None and n.grad_error == 0 for n in roomy.neighbours)
    tight_budget = roomy.predicted_saved_bytes - 4 * 8 * 8 * 16 * 16  # less than the BatchNorms' inputs
    tight = plan(model, [batch], budget=tight_budget, loss_fn=LOSS, candidates="all")
    assert any(n.eps is not None for n in tight.neighbours)
    applied = tight.apply(copy.deepcopy(model))
    assert measured_saved_bytes(applied, batch) == tight.predicted_saved_bytes <= tight_budget
    states = {n: actcomp.layer_state(applied[int(n)]) for n in ("2", "5")}
    for n in tight.neighbours:
        assert states[n.name].approximate == (n.eps is not None)
        if n.eps is not None:
            assert states[n.name].config.eps == n.eps
    tight.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == tight
    assert "(neighbour)" in tight.table()


def test_plan_on_svd_adapted_layers():
    """A layer whose weight is computed (actcomp.peft) is planned on the parameters its weight
    comes from; the applied plan keeps what it predicts."""
    from actcomp.peft import svd_adapt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    svd_adapt(model, ["2", "4"], reflections=4)
    batch = (torch.randn(32, 12).cumsum(0) / 6, torch.randint(0, 4, (32,)))
    p = plan(model, [batch], budget=10**9, loss_fn=LOSS, candidates=["2", "4"])
    assert [c.train for c in p.choices] == [True, True]
    applied = p.apply(copy.deepcopy(model))
    assert measured_saved_bytes(applied, batch) == p.predicted_saved_bytes


class _Scale(nn.Module):
    def forward(self, x):
        return x * 2


def test_the_planner_trades_the_neighbours_its_registration_names():
    """Which neighbours the planner may trade is a field of their registration, not a list
    of types in the planner."""
    from actcomp.memory.plan import _candidates
    from actcomp.policies import base as registry

    def handler(module, x, state):
        return None

    model = nn.Sequential(nn.Linear(4, 4), _Scale(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    batch = torch.randn(6, 4)
    assert _candidates(model, [batch], "all").tradeable == ["2"]
    registry.register_neighbour(_Scale, tradeable=lambda module: True)(handler)
    try:
        assert _candidates(model, [batch], "all").tradeable == ["1", "2"]
    finally:
        del registry._REGISTRY[_Scale]
        registry._RESOLVED.clear()


def test_the_averaged_error_is_measured_over_the_batches_and_minimised():
    """By default each layer's error is sqrt(bias^2 + spread^2 / 10) over the calibration
    batches (RunningError), recomputed here from each layer's own gradients; total_error is
    their sum, frozen layers 1; the relative error is still reported beside it."""
    torch.manual_seed(0)
    model = conv_net()
    batches = [data((8, 3, 16, 16), 4, seed=s) for s in range(3)]
    roomy = plan(model, batches, budget=10**9, loss_fn=LOSS, eps_grid=(0.5, 0.9))
    assert roomy.error_measure == "averaged"
    assert abs(roomy.total_error - sum(c.averaged_error for c in roomy.choices) - sum(n.averaged_error for n in roomy.neighbours)) < 1e-12
    layer = next(c for c in roomy.choices if c.name == "3")
    assert layer.train and layer.eps in (0.5, 0.9) and layer.averaged_error is not None
    running = RunningError()
    for x, y in batches:  # the layer's input and output gradient in a plain step, then its weight gradient at the eps
        work = copy.deepcopy(model)
        captured = {}

        def hook(module, args, out):
            captured["x"] = args[0].detach()
            out.register_hook(lambda g: captured.update(dy=g))

        work[3].register_forward_hook(hook)
        LOSS(work(x), y).backward()
        exact_layer, compressed_layer = copy.deepcopy(model[3]), copy.deepcopy(model[3])
        actcomp.compress(compressed_layer, [""], config=actcomp.CompressionConfig("hosvd", layer.eps))
        grads = [torch.autograd.grad(m(captured["x"]), m.weight, captured["dy"])[0] for m in (compressed_layer, exact_layer)]
        running.add(*grads)
    assert layer.averaged_error == pytest.approx(running.averaged(), rel=1e-6, abs=1e-9)
    relative = plan(model, batches, budget=10**9, loss_fn=LOSS, eps_grid=(0.5, 0.9), error="relative")
    assert relative.error_measure == "relative" and all(c.averaged_error is None for c in relative.choices)
    assert abs(relative.total_error - sum(c.grad_error for c in relative.choices) - sum(n.grad_error for n in relative.neighbours)) < 1e-12
    assert "averaged error" in roomy.table() and "total averaged error" in roomy.table()


def test_one_batch_is_measured_in_chunks_and_a_tiny_one_falls_back_with_a_note():
    torch.manual_seed(0)
    model = conv_net()
    chunked = plan(model, [data((8, 3, 16, 16), 4)], budget=10**9, loss_fn=LOSS, eps_grid=(0.5,))
    assert chunked.error_measure == "averaged" and all(c.averaged_error is not None for c in chunked.trained)
    tiny = plan(model, [data((3, 3, 16, 16), 4)], budget=10**9, loss_fn=LOSS, eps_grid=(0.5,))
    assert tiny.error_measure == "relative" and any("too small to measure the averaged error" in n for n in tiny.notes)


def test_a_plan_saved_before_the_averaged_error_loads_as_relative(tmp_path):
    torch.manual_seed(0)
    p = plan(conv_net(), [data((8, 3, 16, 16), 4)], budget="40KiB", loss_fn=LOSS, eps_grid=(0.6, 0.9), error="relative")
    data_ = json.loads(p.to_json())
    for key in ("error_measure",):
        data_.pop(key)
    for c in data_["choices"] + data_["neighbours"]:
        c.pop("averaged_error")
    old = Plan.from_json(json.dumps(data_))
    assert old == p and old.total_error == p.total_error
