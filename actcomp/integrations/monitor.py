"""What a training-loop callback does around each step, whatever the loop: compress the model
once, count what each training step keeps, compare it with plain autograd, and name the layers
that are left out.

The counting is :class:`actcomp.count_saved` entered when a step begins and left when it ends
(``saved_tensors_hooks`` are per thread, not per call, so a callback may open and close them
around a framework's own forward and backward). The plain figure is measured once, on the first
step's inputs: the same forward with compression suspended (:func:`actcomp.suspended`) under
``count_saved``, without a backward (what autograd keeps is fixed when the forward ends, and no
gradient is touched). whole-step ratio = saved bytes of the step / saved bytes of plain.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

from torch import nn

from actcomp.attach.swap import compress, compressed_layers, stats, suspended
from actcomp.core.state import trains_weight
from actcomp.kernels import is_supported
from actcomp.memory.saved import count_saved


class LeftOutLayersWarning(UserWarning):
    """Trained layers with a compressed kernel that compression does not cover (their weight
    is read by their parent, a selection left them out): they keep their inputs plain."""


class StepMonitor:
    """Compression and its per-step figures for one model, for training-loop callbacks.

    ``compress_kwargs`` go to :func:`actcomp.compress` (``layers``, ``method``, ``eps``,
    ``neighbours``, ``sample``...). :meth:`attach` compresses (and warns about trained layers
    left out), :meth:`begin_step` / :meth:`end_step` bracket one training step and return its
    figures: ``saved_bytes`` (everything autograd kept, counted once per storage),
    ``factor_bytes`` and ``input_bytes`` (the compressed layers' factors and their inputs),
    ``compressed_layers``, ``layers_not_run`` and, once :meth:`measure_plain` ran,
    ``plain_saved_bytes`` and ``whole_step_ratio`` = saved_bytes / plain_saved_bytes.
    """

    def __init__(self, **compress_kwargs: Any) -> None:
        self.compress_kwargs = compress_kwargs
        self.plain_saved_bytes: int | None = None
        self.history: list[dict[str, float]] = []
        self._counting: count_saved | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        """Compress ``model`` in place (again after ``from_pretrained`` or a wrapper replaced
        its layers) and warn, naming them, about trained supported layers left out."""
        compress(model, **self.compress_kwargs)
        chosen = set(compressed_layers(model))
        left_out = [n for n, m in model.named_modules() if is_supported(type(m)) and trains_weight(m) and n not in chosen]
        if left_out:
            shown = ", ".join(f"'{n}'" for n in left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
            warnings.warn(
                f"{len(left_out)} trained layer(s) with a compressed kernel are not compressed and keep their inputs plain: "
                f"{shown}; widen layers= (or see the warnings compress gave for them)",
                LeftOutLayersWarning,
                stacklevel=3,
            )
        return model

    def begin_step(self, model: nn.Module) -> None:
        """Start counting what autograd keeps (call before the step's forward)."""
        self.end_counting()
        self._counting = count_saved(model)
        self._counting.__enter__()

    def end_counting(self) -> int | None:
        """Stop counting; the bytes counted, or None when no count was open."""
        if self._counting is None:
            return None
        counting, self._counting = self._counting, None
        counting.__exit__(None, None, None)
        return counting.result.saved_bytes

    def measure_plain(self, model: nn.Module, forward: Callable[[], Any]) -> int:
        """What plain autograd keeps in ``forward()`` (the step's forward and loss, on the same
        inputs), with compression suspended; no backward runs and no gradient is touched."""
        with suspended(model), count_saved(model) as plain:
            out = forward()
        del out
        self.plain_saved_bytes = plain.saved_bytes
        return plain.saved_bytes

    def end_step(self, model: nn.Module, plain_forward: Callable[[], Any] | None = None) -> dict[str, float]:
        """Stop counting and return this step's figures (also appended to ``history``);
        ``plain_forward`` (the step's forward and loss on its inputs) measures plain autograd's
        figure the first time one is given (:meth:`measure_plain`)."""
        saved = self.end_counting()
        if plain_forward is not None and self.plain_saved_bytes is None:
            self.measure_plain(model, plain_forward)
        layer_stats = stats(model)
        figures: dict[str, float] = {
            "compressed_layers": len(compressed_layers(model)),
            "factor_bytes": sum(s.kept_bytes for s in layer_stats.values()),
            "input_bytes": sum(s.input_bytes for s in layer_stats.values()),
            "layers_not_run": sum(1 for s in layer_stats.values() if s.method == "not run"),
        }
        if saved is not None:
            figures["saved_bytes"] = saved
            if self.plain_saved_bytes:
                figures["plain_saved_bytes"] = self.plain_saved_bytes
                figures["whole_step_ratio"] = saved / self.plain_saved_bytes
        self.history.append(figures)
        return figures
