"""What every export does to its file: strip metadata, then check onnxruntime against eager."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor


def strip_metadata(path: Path) -> None:
    """Remove producer, doc strings and metadata properties from an ONNX file; check it. The
    graph is saved as one file: tensors the exporter put in external data files (``NAME.data``,
    written even when empty) are taken in, and those files removed (none is left unreferenced)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(str(path), load_external_data=False)
    external = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    load_external_data_for_model(model, str(path.parent))
    model.producer_name = model.producer_version = model.doc_string = ""
    del model.metadata_props[:]
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        value.doc_string = ""
        del value.metadata_props[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    for name in external | {path.name + ".data"}:
        if name != path.name and Path(name).name == name:  # a file beside the graph, never one elsewhere
            (path.parent / name).unlink(missing_ok=True)


def check_against_eager(path: Path, args: Sequence[Tensor], expected: Sequence[Tensor], tolerance: float, what: str) -> tuple[float, float]:
    """Run the graph with onnxruntime (CPU) on ``args`` and compare every output with
    ``expected``. Returns (largest absolute difference, allowed difference): the tolerance is
    absolute, relative to the outputs' scale when that exceeds 1. Beyond it the file is removed
    and ValueError raised."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    results = session.run(None, feeds)
    error = max(float(np.abs(r - e.detach().cpu().numpy()).max()) for r, e in zip(results, expected))
    bound = tolerance * max(1.0, max(float(e.abs().max()) for e in expected))
    if error > bound:
        path.unlink()
        raise ValueError(f"onnxruntime differs from {what} by {error:.3g} (tolerance {bound:.3g}); not exported")
    return error, bound
