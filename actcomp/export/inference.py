"""onnx_inference(): the model's eval-mode forward as an ONNX graph, checked with onnxruntime."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from actcomp.core.files import atomic_write, temporary_path
from actcomp.export.verify import check_against_eager, strip_metadata
from actcomp.attach.swap import restore


@dataclass(frozen=True)
class InferenceExport:
    """Where the graph went, how big it is, and how far onnxruntime is from eager PyTorch."""

    path: str
    size_bytes: int
    opset: int
    max_abs_error: float
    tolerance: float


def onnx_inference(
    model: nn.Module,
    example: Tensor | tuple[Tensor, ...],
    path: str | Path,
    *,
    opset: int = 17,
    tolerance: float = 1e-4,
) -> InferenceExport:
    """Export ``model`` in eval mode to ONNX at ``path`` and verify it against eager PyTorch.

    The graph is the plain inference forward (compression only changes what training keeps,
    so a compressed model exports as its restored copy; the model itself is left untouched),
    with static shapes taken from ``example`` and its metadata (producer, doc strings)
    stripped. onnxruntime (CPU) runs it on ``example``; if the largest absolute difference from
    ``model(example)`` exceeds ``tolerance`` (relative to the output's scale when larger than
    1), ValueError is raised and nothing is written. The graph is written to a temporary file of
    this writer's own and renamed over ``path`` once verified (a kill leaves the old file).
    """
    args = example if isinstance(example, tuple) else (example,)
    plain = restore(copy.deepcopy(model)).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            expected = plain(*args)
            # The TorchScript exporter: fast and exact for these static eval graphs; torch marks it
            # deprecated in favour of the torch.export-based one, which needs onnxscript.
            warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
            torch.onnx.export(plain, args, str(tmp), opset_version=opset, dynamo=False, do_constant_folding=True)
        strip_metadata(tmp)
        expected_list = [expected] if isinstance(expected, Tensor) else list(expected)
        error, bound = check_against_eager(tmp, args, expected_list, tolerance, "eager PyTorch")
        atomic_write(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return InferenceExport(str(path), path.stat().st_size, opset, error, bound)
