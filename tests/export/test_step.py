"""ONNX training step with compressed activations: verified against eager, runs without PyTorch."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import actcomp
from actcomp.app.data import digits
from actcomp.export import export_bundle, graph_memory_plan, training_step
from actcomp.export.step import _StepBuilder, subspace_step

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def head_model(train_conv=False):
    """A conv front (BatchNorm frozen on its running statistics) and two trainable Linear layers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(4), nn.Flatten(),
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5),
    )
    model[:5].requires_grad_(False)
    model[0].requires_grad_(train_conv)
    return model


def conv_model():
    """Dense strided conv, frozen BatchNorm, depthwise dilated conv with channel multiplier, Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU6(),
        nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 3),
    )
    model[1].requires_grad_(False)
    return model.eval()


def test_step_is_plain_sgd_at_eps_one_with_full_ranks():
    """With ranks >= every mode and eps = 1 the factorisations are exact: the compressed step
    (conv and Linear layers) equals a plain-autograd SGD step."""
    model = conv_model().double()
    x, y = torch.randn(6, 2, 10, 10, dtype=torch.float64), torch.randint(0, 3, (6,))
    builder = _StepBuilder(model, 100, 1.0, 0.0, x)
    out = builder(*builder.initial(), x, y, torch.tensor(0.1, dtype=torch.float64))
    reference = copy.deepcopy(model)
    loss = nn.functional.cross_entropy(reference(x), y)
    loss.backward()
    plain = [(p - 0.1 * p.grad).detach() for p in reference.parameters() if p.requires_grad]
    assert len(plain) == 6
    for ours, theirs in zip(out, plain):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    assert abs(float(out[-1]) - float(loss)) < 1e-12


def test_conv_step_exports_and_matches_eager(tmp_path):
    model = conv_model()
    x, y = torch.randn(6, 2, 10, 10), torch.randint(0, 3, (6,))
    result = training_step(model, (x, y), tmp_path / "conv.onnx", max_rank=4, eps=0.9)
    assert result.max_abs_error <= result.tolerance
    assert [n for n in result.inputs if n.startswith("basis.")] == [f"basis.{i}.{m}" for i in (0, 3) for m in "chw"] + ["basis.6"]


def test_subspace_step_masks_to_the_eps_rank():
    torch.manual_seed(0)
    x = torch.randn(40, 3) @ torch.randn(3, 12) + 1e-3 * torch.randn(40, 12)  # rank ~3
    basis, masked = subspace_step(x.double(), torch.linalg.qr(torch.randn(12, 6, dtype=torch.float64)).Q, 0.99)
    assert torch.allclose(basis.T @ basis, torch.eye(6, dtype=torch.float64), atol=1e-10)
    kept = int((masked.abs().sum(0) > 0).sum())
    assert 1 <= kept <= 3
    energy = ((x.double() @ masked) ** 2).sum() / (x.double() ** 2).sum()
    assert energy >= 0.99 - 1e-6


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_step_matches_eager_and_is_clean(tmp_path, momentum):
    model = head_model()
    x, y = digits((5, 6, 7, 8, 9), size=16)
    result = training_step(model, (x[:16], y[:16]), tmp_path / "step.onnx", momentum=momentum)
    assert result.max_abs_error <= result.tolerance
    graph = onnx.load(result.path)
    assert graph.opset_import[0].version >= 17 and not graph.metadata_props and graph.producer_name == ""
    assert [i.name for i in graph.graph.input] == result.inputs
    expected_state = ["5.weight", "5.bias", "7.weight", "7.bias"]
    if momentum:
        expected_state += [f"momentum.{n}" for n in expected_state]
    assert result.inputs == [*expected_state, "basis.5", "basis.7", "x", "y", "lr"]
    # Frozen layers are initializers, not inputs: the conv weight is in the graph.
    assert any(t.dims == [4, 1, 3, 3] for t in graph.graph.initializer)
    plan = graph_memory_plan(result.path)
    assert plan.peak_bytes > 0


@pytest.mark.parametrize(
    "layer, message",
    [
        (nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), "supports zero padding given as integers"),
        (nn.Conv2d(1, 4, 3, padding="same"), "supports zero padding given as integers"),
        (nn.Conv2d(4, 8, 3, padding=1, groups=2), "supports dense \\(groups=1\\) or depthwise convolutions"),
        (nn.Conv1d(1, 4, 3, padding=1), "\\(Conv1d\\) is trainable; the training-step export supports 2-D convolutions"),
    ],
)
def test_unsupported_trainable_layers_are_refused(tmp_path, layer, message):
    channels = layer.in_channels
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(5))
    shape = (4, channels, 16) if isinstance(layer, nn.Conv1d) else (4, channels, 16, 16)
    model(torch.randn(shape))
    with pytest.raises(ValueError, match=f"layer '0' .*{message}"):
        training_step(model, (torch.randn(shape), torch.randint(0, 5, (4,))), tmp_path / "s.onnx")


def test_bundle_runner_trains_without_torch_and_matches_eager(tmp_path):
    model = head_model(train_conv=True)
    x, y = digits((5, 6, 7, 8, 9), size=16)
    bundle = tmp_path / "bundle"
    manifest = export_bundle(model, (x[:32], y[:32]), bundle, data=(x[:320], y[:320]), device="stm32h743", lr=0.2, momentum=0.9)
    for name in ("step.onnx", "model.onnx", "state.npz", "data.npz", "manifest.json", "runner.py"):
        assert (bundle / name).exists(), name
    assert "fits stm32h743" in manifest["memory_plan"]["verdict"]
    # The runner in a fresh interpreter that cannot import torch.
    runner = str(bundle / "runner.py")
    code = f"import runpy, sys; sys.modules['torch'] = None; sys.argv = [{runner!r}, '--steps', '10']; runpy.run_path({runner!r}, run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=bundle)
    assert out.returncode == 0, out.stderr
    losses = [float(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 10 and losses[-1] < losses[0]
    # The same ten steps in eager PyTorch, on the same factorisation.
    builder = _StepBuilder(model, manifest["max_rank"], manifest["eps"], manifest["momentum"], x[:32])
    state = builder.initial()
    eager = []
    for step in range(10):
        start = step * 32
        outputs = builder(*state, x[start : start + 32], y[start : start + 32], torch.tensor(0.2))
        state, loss = list(outputs[:-1]), outputs[-1]
        eager.append(float(loss))
    assert np.allclose(losses, eager, rtol=1e-4, atol=1e-5)
    final = dict(np.load(bundle / "state.npz"))
    names = json.loads((bundle / "manifest.json").read_text())["state_inputs"]
    assert names[:2] == ["0.weight", "0.bias"]  # the conv is trained too
    for name, eager_value in zip(names, state):
        assert np.allclose(final[name], eager_value.numpy(), atol=1e-4), name
    assert actcomp.compressed_layers(model) == {}


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=4),  # depthwise, channel multiplier 2
        nn.Conv2d(3, 3, (3, 1), stride=(1, 2), padding=(1, 0), groups=3),
    ],
    ids=["dense-strided", "depthwise-dilated-multiplier", "depthwise-rectangular"],
)
def test_exported_conv_weight_gradient_is_the_runtime_kernels(conv):
    """The step's conv backward (convolutions only) gives the runtime kernel's dW on the same
    factors, masked columns included."""
    from actcomp.export.step import _ExportedLayer, _export_call
    from actcomp.linalg.factors import Tucker, mode_product
    from actcomp.kernels.conv import ConvGeometry, tucker_weight_grad

    conv = conv.double()
    x = torch.randn(5, conv.in_channels, 9, 10, dtype=torch.float64)
    bases = [torch.linalg.qr(torch.randn(n, min(n, 3), dtype=torch.float64)).Q for n in x.shape]
    bases[1][:, -1] = 0  # a column beyond the eps rank, masked as the graph masks it
    weight = conv.weight.detach().clone().requires_grad_()
    y = _ExportedLayer.apply(x, weight, conv.bias, _export_call("conv", conv), *bases)
    dy = torch.randn_like(y)
    (exported,) = torch.autograd.grad(y, weight, dy)
    core = x
    for mode, u in enumerate(bases):
        core = mode_product(core, u.T, mode)
    runtime = tucker_weight_grad(Tucker(core, tuple(bases)), dy, weight.shape, ConvGeometry.of(conv))
    assert torch.allclose(exported, runtime, rtol=0, atol=1e-12 * runtime.abs().max())


def test_exported_linear_weight_gradient_is_the_runtime_kernels():
    from actcomp.export.step import _ExportedLayer, _export_call
    from actcomp.linalg.factors import LowRank
    from actcomp.kernels.linear import lowrank_weight_grad

    x = torch.randn(7, 6, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64)).Q
    weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = _ExportedLayer.apply(x, weight, None, _export_call("linear", nn.Linear(6, 4, bias=False)), basis)
    dy = torch.randn_like(y)
    (exported,) = torch.autograd.grad(y, weight, dy)
    runtime = lowrank_weight_grad(LowRank(x @ basis, basis.T), dy)
    assert torch.allclose(exported, runtime, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "layer, message",
    [
        (nn.LayerNorm(6), "\\(LayerNorm\\) is trainable; the training-step export supports trainable Conv2d and Linear layers only"),
        ("svd", "\\(SVDLinear\\) is trainable; the training-step export supports trainable Conv2d and Linear"),
    ],
    ids=["unregistered", "computed-weight"],
)
def test_layers_without_export_kernels_are_refused_by_the_registry(layer, message):
    """A type the registry does not run, or runs with a computed weight, has no exported step."""
    from actcomp.export.step import _export_call
    from actcomp.peft import svd_adapt

    if layer == "svd":
        layer = svd_adapt(nn.Sequential(nn.Linear(6, 4)))[0]

    with pytest.raises(ValueError, match=f"layer 'head' {message}"):
        _export_call("head", layer)


def test_family_without_an_exported_weight_gradient_for_static_factors_is_refused(monkeypatch):
    """A family whose export kernels take none of the export's static factor types (LowRank rows,
    Tucker) names the layer, the factor types and the family."""
    import dataclasses

    from actcomp.export.step import _export_call
    from actcomp.kernels import base as kernels
    from actcomp.kernels.linear import LINEAR
    from actcomp.linalg.factors import PatchMeans

    monkeypatch.setattr(kernels, "_REGISTRY", dict(kernels._REGISTRY))
    monkeypatch.setattr(kernels, "_RESOLVED", {})
    patches_only = dataclasses.replace(LINEAR, name="patches", export=dataclasses.replace(LINEAR.export, weight_grads={PatchMeans: None}))

    class Patched(nn.Linear):
        pass

    actcomp.register_layer(Patched, family=patches_only)
    with pytest.raises(ValueError, match="layer 'p' \\(Patched\\) .*keeps LowRank, Tucker factors, for which the patches family has no exportable"):
        _export_call("p", Patched(3, 2))
