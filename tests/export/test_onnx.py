"""ONNX inference export (checked against eager) and the static memory plan of a graph."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import actcomp
from actcomp.export import graph_memory_plan, onnx_inference
from actcomp.app.models import TinyMobileNet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class AudioNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 5, padding=2, padding_mode="reflect")
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(-1))


@pytest.mark.parametrize("build, shape", [(lambda: TinyMobileNet(5), (2, 1, 32, 32)), (AudioNet, (3, 4, 40))])
def test_inference_export_matches_eager(tmp_path, build, shape):
    torch.manual_seed(0)
    model = actcomp.compress(build(), eps=0.8)  # compression does not change inference
    x = torch.randn(shape)
    result = onnx_inference(model, x, tmp_path / "model.onnx")
    assert result.max_abs_error <= result.tolerance and result.size_bytes > 0
    assert actcomp.compressed_layers(model)  # the user's model keeps its compression
    loaded = onnx.load(result.path)
    assert loaded.producer_name == "" and all(n.doc_string == "" for n in loaded.graph.node)


def test_memory_plan_by_hand(tmp_path):
    """Linear(10->20) -> ReLU -> Linear(20->5) on a batch of 4, float32:
    x (160 B) lives until Gemm 0 ends; h (320 B) from Gemm 0 to Relu; r (320 B) from Relu to
    Gemm 2; y (80 B) from Gemm 2 to the end. Peak: 640 B while the ReLU runs (h and r)."""
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    result = onnx_inference(model, torch.randn(4, 10), tmp_path / "mlp.onnx")
    plan = graph_memory_plan(result.path)
    assert sorted(t.nbytes for t in plan.tensors) == [80, 160, 320, 320]
    assert plan.peak_bytes == 640 and plan.nodes[plan.peak_step].startswith("Relu")
    assert plan.weights_bytes == (10 * 20 + 20 + 20 * 5 + 5) * 4
    assert [plan.live_bytes(i) for i in range(3)] == [160 + 320, 640, 320 + 80]
    assert json.loads(plan.to_json())["peak_bytes"] == 640


def test_plan_matches_onnxruntime_profiler_node_outputs(tmp_path):
    """Cross-check: with graph optimisations off, onnxruntime's profiler reports each node's
    output bytes; they must equal the plan's sizes for that node's outputs. (Its arena peak
    is not in the profile; the arena may also reuse buffers in place, which this plan does not.)"""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    result = onnx_inference(TinyMobileNet(5), x, tmp_path / "tiny.onnx")
    plan = graph_memory_plan(result.path)
    sizes = {t.name: t.nbytes for t in plan.tensors}
    scheduled = [n.split(":", 1)[1] for n in plan.nodes]
    graph = onnx.load(result.path).graph
    expected = {node.name: sum(sizes[o] for o in node.output if o) for node in graph.node if node.name in scheduled}
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(result.path, options, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: x.numpy()})
    events = json.loads(open(session.end_profiling()).read())
    reported = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            reported[event["name"][: -len("_kernel_time")]] = int(event["args"]["output_size"])
    # Every scheduled node ran; onnxruntime also runs some of the constant-only nodes (Identity
    # of an initializer) at every step, which the plan counts with the weights instead.
    folded = {n.split(":", 1)[1] for n in plan.folded}
    assert set(scheduled) <= set(reported) and set(reported) - set(scheduled) <= folded
    for name in scheduled:
        assert reported[name] == expected[name], name


def test_verdict_against_devices(tmp_path):
    torch.manual_seed(0)
    result = onnx_inference(TinyMobileNet(5), torch.randn(1, 1, 32, 32), tmp_path / "tiny.onnx")
    plan = graph_memory_plan(result.path)
    mcu = plan.verdict("stm32f746")  # weights in flash, activations in RAM
    assert mcu.fits and mcu.ram_needed == plan.peak_bytes and mcu.flash_needed == plan.weights_bytes
    assert mcu.margin_bytes == actcomp.load_device("stm32f746").budget_bytes - plan.peak_bytes
    tiny = actcomp.devices.parse_device({
        "name": "tiny", "title": "t", "kind": "mcu", "ram_bytes": plan.peak_bytes, "flash_bytes": 10**6,
        "reserve_bytes": 1, "peak_ops_per_s": 1.0, "peak_precision": "fp32", "source": "test",
    })
    assert not plan.verdict(tiny).fits
    jetson = plan.verdict("jetson-nano-4gb")
    assert jetson.ram_needed == plan.peak_bytes + plan.weights_bytes and "fits jetson-nano-4gb: yes" in str(jetson)


def test_dynamic_shapes_are_refused(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(model, (torch.randn(2, 3),), str(path), dynamo=False, dynamic_axes={"input": {0: "batch"}}, input_names=["input"])
    with pytest.raises(ValueError, match="dynamic shape"):
        graph_memory_plan(path)
    assert np.isfinite(1.0)


def test_export_command(tmp_path, capsys):
    from actcomp.app.cli import main

    assert main(["export", "--device", "stm32f746", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fits stm32f746: yes" in out
    plan = json.loads((tmp_path / "memory_plan.json").read_text())
    assert plan["peak_bytes"] > 0 and (tmp_path / "model.onnx").exists()
