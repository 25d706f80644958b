"""A Hugging Face ``transformers.TrainerCallback`` that compresses the model when training
starts and logs, per step, what autograd kept and the whole-step ratio against plain.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[ActcompTrainerCallback(eps=0.9)])

Compression is not saved with the weights: a model loaded again with ``from_pretrained`` is a
plain model, and the callback (or ``actcomp.compress``) compresses it again when training
starts. The figures of each step are added to the Trainer's logs under ``actcomp/`` (the
reporters that come after this callback see them) and kept in ``callback.monitor.history``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised where transformers is absent
    raise ImportError("actcomp.integrations.hf needs transformers: pip install transformers") from error

from actcomp.integrations.monitor import StepMonitor


class ActcompTrainerCallback(TrainerCallback):
    """Compress the Trainer's model on ``on_train_begin`` (``compress_kwargs`` go to
    :func:`actcomp.compress`); count what each step keeps (``on_step_begin`` to
    ``on_step_end``; with gradient accumulation, over the optimizer step's forwards); measure
    plain autograd once on the first step's inputs (``measure_plain``: the model's forward on
    the keyword arguments the Trainer gave it, compression suspended, no backward) and report
    whole_step_ratio = saved bytes / plain's; add the last figures to each log."""

    def __init__(self, measure_plain: bool = True, **compress_kwargs: Any) -> None:
        self.monitor = StepMonitor(**compress_kwargs)
        self.measure_plain = measure_plain
        self._inputs: tuple[tuple, dict] | None = None
        self._hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None:
            self.monitor.attach(model)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._inputs = (args, dict(kwargs))
        self._release_hook()

    def _release_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            return
        if self.measure_plain and self.monitor.plain_saved_bytes is None and self._hook is None and self._inputs is None:
            self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)
        self.monitor.begin_step(model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            return
        plain = None
        if self._inputs is not None and self.monitor.plain_saved_bytes is None:
            call_args, call_kwargs = self._inputs
            plain = lambda: model(*call_args, **call_kwargs)  # noqa: E731
        self.monitor.end_step(model, plain)
        self._inputs = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None and self.monitor.history:
            logs.update({f"actcomp/{k}": v for k, v in self.monitor.history[-1].items()})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._release_hook()
        self.monitor.end_counting()
