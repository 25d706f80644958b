"""A Lightning ``Callback`` that compresses the LightningModule when fitting starts and logs,
per training batch, what autograd kept and the whole-step ratio against plain.

    trainer = L.Trainer(callbacks=[ActcompLightningCallback(eps=0.9)])

Works with ``lightning`` (``lightning.pytorch``) or the older ``pytorch_lightning`` package.
A module restored with ``load_from_checkpoint`` is plain: the callback compresses it again
when the next fit starts (or call ``actcomp.compress`` on it).
"""

from __future__ import annotations

from typing import Any

from torch import nn

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as error:
        raise ImportError("actcomp.integrations.lightning needs lightning: pip install lightning") from error

from actcomp.integrations.monitor import StepMonitor


class ActcompLightningCallback(Callback):
    """Compress the LightningModule on ``on_fit_start`` (``compress_kwargs`` go to
    :func:`actcomp.compress`); count what each training batch keeps (``on_train_batch_start``
    to ``on_train_batch_end``); measure plain autograd once on the first batch
    (``measure_plain``: ``training_step`` again with compression suspended, no backward) and
    log ``actcomp/saved_bytes``, ``actcomp/whole_step_ratio`` and the layer figures."""

    def __init__(self, measure_plain: bool = True, **compress_kwargs: Any) -> None:
        self.monitor = StepMonitor(**compress_kwargs)
        self.measure_plain = measure_plain

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self.monitor.attach(pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        self.monitor.begin_step(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        plain = None
        if self.measure_plain and self.monitor.plain_saved_bytes is None:
            plain = lambda: pl_module.training_step(batch, batch_idx)  # noqa: E731
        figures = self.monitor.end_step(pl_module, plain)
        pl_module.log_dict({f"actcomp/{k}": float(v) for k, v in figures.items()}, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self.monitor.end_counting()
