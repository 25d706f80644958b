"""Export for deployment: ONNX inference graphs and ONNX training steps with compressed
activations, both verified against eager PyTorch; a bundle with an onnxruntime + numpy runner;
and the static memory plan of any ONNX graph (liveness of every tensor over the node schedule).
"""

from actcomp.export.bundle import export_bundle
from actcomp.export.inference import InferenceExport, onnx_inference
from actcomp.export.memory import GraphMemoryPlan, TensorLife, Verdict, graph_memory_plan
from actcomp.export.step import StepExport, training_step

__all__ = [
    "GraphMemoryPlan",
    "InferenceExport",
    "StepExport",
    "TensorLife",
    "Verdict",
    "export_bundle",
    "graph_memory_plan",
    "onnx_inference",
    "training_step",
]
