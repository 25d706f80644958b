"""Exact memory levers of a fine-tuning step, each composable with :func:`actcomp.compress`.

* :func:`optimizer_in_backward`: the optimizer step runs per parameter inside backward and frees
  each gradient (all parameter gradients alive -> the largest one); exact for element-wise
  optimizers (:data:`EXACT_OPTIMIZERS`).
* :func:`microbatch_step`: one step's batch as k chunks with accumulated, size-weighted
  gradients (every activation term / k); exact without batch statistics,
  :func:`freeze_batchnorm` makes BatchNorm exact.
* :func:`checkpoint_blocks`: non-reentrant recompute of whole blocks, or of regions (runs of
  sibling modules the parent's forward chains, found by :func:`auto_regions`) (their saved
  tensors -> their inputs, at one extra forward); exact, BatchNorm running statistics updated once.
"""

from actcomp.levers.microbatch import (
    batch_statistics_modules,
    freeze_batchnorm,
    microbatch_step,
    split_batch,
)
from actcomp.levers.recompute import Recompute, auto_blocks, auto_regions, checkpoint_blocks
from actcomp.levers.step_in_backward import (
    EXACT_OPTIMIZERS,
    StepInBackward,
    optimizer_in_backward,
)

__all__ = [
    "EXACT_OPTIMIZERS",
    "Recompute",
    "StepInBackward",
    "auto_blocks",
    "auto_regions",
    "batch_statistics_modules",
    "checkpoint_blocks",
    "freeze_batchnorm",
    "microbatch_step",
    "optimizer_in_backward",
    "split_batch",
]
