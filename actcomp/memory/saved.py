"""Count what autograd keeps for backward, through ``torch.autograd.graph.saved_tensors_hooks``.

Every tensor autograd saves during a forward (by built-in ops and by custom Functions'
``save_for_backward``) passes through the pack hook. Bytes are counted once per storage: a view
keeps its whole storage alive, and two views of one storage cost it once. Storages of the
model's parameters are reported apart, since they are held whether or not autograd keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from actcomp.core.dispatch import kept_tensors, observing


@dataclass
class SavedTensors:
    """The storages autograd saved during the ``with`` block, keyed by (device, data pointer)."""

    parameter_keys: set[tuple[str, int]] = field(default_factory=set)
    storages: dict[tuple[str, int], int] = field(default_factory=dict)
    parameter_storages: dict[tuple[str, int], int] = field(default_factory=dict)
    shapes: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)

    def _observe(self, tensor: Tensor, kept: Any) -> None:
        for t in kept_tensors(kept):
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            target = self.parameter_storages if key in self.parameter_keys else self.storages
            if storage.nbytes() > 0:
                target[key] = storage.nbytes()
            self.shapes.append((tuple(t.shape), t.dtype))

    @property
    def saved_bytes(self) -> int:
        """Bytes of the saved storages that are not parameters of the watched model."""
        return sum(self.storages.values())

    @property
    def parameter_bytes(self) -> int:
        """Bytes of saved storages that belong to the watched model's parameters."""
        return sum(self.parameter_storages.values())


class count_saved:
    """Context manager: ``with count_saved(model) as saved: loss = f(model(x))``.

    Afterwards ``saved.saved_bytes`` holds the bytes autograd keeps for backward, counted once
    per storage, excluding the storages of ``model``'s parameters (``saved.parameter_bytes``).
    Tensors are passed through unchanged: the forward computes what it computes without it.
    Where actcomp's generic packer replaces a saved tensor, what it keeps instead is counted.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.result = SavedTensors()
        if model is not None:
            self.result.parameter_keys = {
                (str(p.device), p.untyped_storage().data_ptr()) for p in model.parameters()
            }
        self._hooks = observing(self.result._observe)

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self.result

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

