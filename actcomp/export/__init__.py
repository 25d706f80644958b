"""Export for deployment: ONNX inference graphs, verified against eager PyTorch, and a static
memory plan of any ONNX graph (liveness of every tensor over the node schedule).

Not here yet: the ONNX training step with compressed activations, the export bundle and its
onnxruntime-only runner (see the project's issue on export).
"""

from actcomp.export.inference import InferenceExport, onnx_inference
from actcomp.export.memory import GraphMemoryPlan, TensorLife, graph_memory_plan

__all__ = ["GraphMemoryPlan", "InferenceExport", "TensorLife", "graph_memory_plan", "onnx_inference"]
