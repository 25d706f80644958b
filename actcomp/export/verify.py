"""What every export does to its file: strip metadata, then check onnxruntime against eager."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor


def strip_metadata(path: Path) -> None:
    """Remove producer, doc strings and metadata properties from an ONNX file; check it."""
    import onnx

    model = onnx.load(str(path))
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
