"""measure(): exact per-module saved bytes on a model small enough to count by hand."""

import json

import pytest
import torch
from torch import nn

import actcomp
from actcomp.linalg.decompose import hosvd
from actcomp.memory import measure
from actcomp.memory.measure import LOSS_ROW, _cpu_allocation_peak


def small_model():
    return nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 5))


def test_plain_saved_bytes_by_hand():
    model = small_model()
    x, y = torch.randn(4, 10), torch.randn(4, 5)
    report = measure(model, x, y, nn.functional.mse_loss, vanilla=False)
    rows = {r.name: r.saved_bytes for r in report.rows}
    # Linear 0 keeps x; Tanh keeps its output, which Linear 2 keeps too (one storage, Tanh's row);
    # mse_loss keeps its input (Linear 2's output) and the target.
    assert rows == {"0": 4 * 10 * 4, "1": 4 * 20 * 4, LOSS_ROW: 2 * 4 * 5 * 4}
    assert report.saved_bytes == sum(rows.values()) == 640
    assert report.weights_bytes == (10 * 20 + 20 + 20 * 5 + 5) * 4 == report.grads_bytes
    assert report.optimizer_state_bytes == 0


def test_compressed_rows_and_vanilla_figures():
    model = small_model()
    x, y = torch.randn(16, 10).cumsum(0), torch.randn(16, 5)
    actcomp.compress(model, ["0"], eps=0.7)
    report = measure(model, x, y, nn.functional.mse_loss)
    row = next(r for r in report.rows if r.name == "0")
    assert row.kind == "compressed"
    assert row.saved_bytes == hosvd(x, 0.7).nbytes < row.vanilla_saved_bytes == x.numel() * 4
    assert row.ratio == row.saved_bytes / row.vanilla_saved_bytes
    assert report.vanilla_saved_bytes == sum(r.vanilla_saved_bytes for r in report.rows)
    assert actcomp.compressed_layers(model) == {"0": actcomp.CompressionConfig("hosvd", 0.7)}  # put back


def test_vanilla_pass_keeps_asi_subspaces():
    model = small_model()
    x = torch.randn(16, 10).cumsum(0)
    actcomp.compress(model, ["0"], method="asi", eps=0.8)
    model(x).sum().backward()
    tracker = actcomp.layer_state(model[0]).tracker
    measure(model, x)
    assert actcomp.layer_state(model[0]).tracker is tracker and tracker.steps == 2


def test_matches_an_independent_count_and_keeps_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(4))
    x, y = torch.randn(6, 3, 12, 12), torch.randint(0, 4, (6,))
    model(x)
    actcomp.compress(model, eps=0.8)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    report = measure(model, x, y, nn.functional.cross_entropy)
    with actcomp.count_saved(model) as saved:
        nn.functional.cross_entropy(model(x), y)
    assert report.saved_bytes == saved.saved_bytes
    for row in report.rows:
        if row.kind == "compressed":  # never a full-size activation
            assert row.saved_bytes < row.vanilla_saved_bytes or row.vanilla_saved_bytes == 0
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[3].weight.grad is None
    assert report.peak_bytes is not None and report.peak_bytes >= report.saved_bytes - x.numel() * 4


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW])
def test_optimizer_state_and_frozen_parameters(optimizer_class):
    """Counted on a stepped copy, for Adam and AdamW (AdamW's defaults hold a key its
    constructor does not take)."""
    model = small_model()
    model[0].requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_class(trainable)
    report = measure(model, torch.randn(4, 10), vanilla=False, optimizer=optimizer)
    grads = sum(p.numel() * 4 for p in trainable)
    assert report.grads_bytes == grads
    # Adam: exp_avg and exp_avg_sq per parameter, plus a float32 step counter each.
    assert report.optimizer_state_bytes == 2 * grads + 4 * len(trainable)
    assert not optimizer.state  # measured on a copy: the user's optimizer took no step
    assert report.step_bytes == report.weights_bytes + grads + report.optimizer_state_bytes + report.saved_bytes


def test_report_prints_and_serialises():
    model = actcomp.compress(small_model(), ["2"], eps=0.9)
    report = measure(model, torch.randn(8, 10))
    text = report.table()
    assert "compressed" in text and "total" in text and "peak" in text
    data = json.loads(report.to_json())
    assert data["saved_bytes"] == report.saved_bytes
    assert [r["name"] for r in data["rows"]] == [r.name for r in report.rows]


@pytest.mark.parametrize("shape", [(8, 4096), (4, 2048, 3)])
def test_decomposition_workspace_stays_small(shape):
    """A mode larger than the rest of the tensor is decomposed from the smaller Gram matrix:
    no I_n x I_n workspace (64 MiB for 4096 features) for a 128 KiB activation."""
    x = torch.randn(shape)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        hosvd(x, 0.9)
    peak = _cpu_allocation_peak(prof)
    assert peak is not None and peak < 8 * x.numel() * 4  # vs 64 MiB for the 4096 x 4096 Gram


def test_device_total_is_resident_plus_peak_with_its_parts():
    """The device total of a step: weights + buffers + optimizer state + batch (resident) +
    the allocator peak; saved bytes split by policy; transients are the rest of the peak."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 5))
    actcomp.compress(model, "all", method="hosvd", eps=0.9)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    report = measure(model, x, y, nn.functional.cross_entropy, optimizer=optimizer, vanilla=False)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert report.buffers_bytes == buffers > 0
    assert report.batch_bytes == x.numel() * 4 + y.numel() * 8
    assert report.resident_bytes == report.weights_bytes + buffers + report.optimizer_state_bytes + report.batch_bytes
    assert report.peak_bytes is not None
    assert report.device_total_bytes == report.resident_bytes + report.peak_bytes
    assert report.transient_bytes == max(0, report.peak_bytes - report.saved_bytes - report.grads_bytes)
    assert sum(report.saved_by_policy.values()) == report.saved_bytes
    assert {"factors", "bits"} <= set(report.saved_by_policy)
    data = json.loads(report.to_json())
    assert data["device_total_bytes"] == report.device_total_bytes
    assert "device total" in report.table()
