"""Training-loop integrations: a Hugging Face ``TrainerCallback`` and a Lightning ``Callback``
that compress the model when training starts, log what each step keeps and the whole-step
ratio against plain autograd, and warn about layers left out.

The framework each needs is imported only when its callback is asked for (actcomp itself needs
torch and numpy only)::

    from actcomp.integrations import ActcompTrainerCallback    # needs transformers
    from actcomp.integrations import ActcompLightningCallback  # needs lightning (or pytorch_lightning)

:class:`~actcomp.integrations.monitor.StepMonitor` is what both share.
"""

from __future__ import annotations

from typing import Any

from actcomp.integrations.monitor import StepMonitor

__all__ = ["ActcompLightningCallback", "ActcompTrainerCallback", "StepMonitor"]


def __getattr__(name: str) -> Any:
    if name == "ActcompTrainerCallback":
        from actcomp.integrations.hf import ActcompTrainerCallback

        return ActcompTrainerCallback
    if name == "ActcompLightningCallback":
        from actcomp.integrations.lightning import ActcompLightningCallback

        return ActcompLightningCallback
    raise AttributeError(f"module 'actcomp.integrations' has no attribute {name!r}")
