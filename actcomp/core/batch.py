"""Batches as users hold them: a tensor, a tuple ``(inputs..., targets)``, or a dict of tensors
(a Hugging Face ``BatchEncoding``) passed as keyword arguments, whose output's ``.loss`` is the
loss. One definition of how a batch is fed to a model, of its size in bytes and of the loss of a
step, shared by fit(), measure(), compress(sample=) and the levers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["batch_bytes", "call_model", "model_inputs", "output_loss", "probe_loss", "step_loss"]


def batch_bytes(batch: object) -> int:
    """Bytes of the tensors of a batch: a tensor, or tuples, lists and dicts of them (nested)."""
    if isinstance(batch, Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, Mapping):
        return sum(batch_bytes(v) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return sum(batch_bytes(v) for v in batch)
    return 0



def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict (a Hugging Face ``BatchEncoding``: keyword arguments),
    ``model(*inputs)`` for a tuple (positional arguments), ``model(inputs)`` otherwise: how
    measure(), plan() and compress(sample=) feed the inputs of a batch (without targets)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def probe_loss(out: Any, targets: object, loss_fn: Callable | None) -> Tensor:
    """A loss to run backward through when measuring a step: ``loss_fn(out, targets)``
    (``loss_fn(out)`` without targets); without a loss_fn the output's own loss (``out.loss``,
    ``out["loss"]``: Hugging Face outputs given labels), else the mean square of the output, or
    of its first tensor (a Hugging Face output without labels: its logits)."""
    if loss_fn is not None:
        return loss_fn(out, targets) if targets is not None else loss_fn(out)
    loss = _own_loss(out)
    if loss is not None:
        return loss
    first = out if isinstance(out, Tensor) else _first_tensor(out)
    if first is None:
        raise TypeError(f"the model's output ({type(out).__name__}) holds no tensor and no .loss: pass loss_fn")
    return first.float().pow(2).mean()


def _own_loss(out: Any) -> Tensor | None:
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    return loss if isinstance(loss, Tensor) else None


def _first_tensor(out: Any) -> Tensor | None:
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for value in values:
        found = value if isinstance(value, Tensor) else _first_tensor(value)
        if found is not None:
            return found
    return None


def step_loss(model: nn.Module, batch: Any, loss_fn: Callable | None) -> Tensor:
    """The training loss of ``model`` on ``batch``, as users hold batches.

    A dict (a Hugging Face ``BatchEncoding``) is passed as keyword arguments; a tuple or list
    as positional arguments, its last element being the targets when ``loss_fn`` is given
    (``loss_fn(model(*batch[:-1]), batch[-1])``); a tensor as the one argument
    (``loss_fn(model(x))`` with a loss_fn). Without ``loss_fn`` the output's ``.loss`` (Hugging
    Face outputs) or the output itself, which must then be a scalar tensor.
    """
    if isinstance(batch, Mapping):
        out = model(**batch)
        return loss_fn(out, batch) if loss_fn is not None else output_loss(out)
    if isinstance(batch, (tuple, list)):
        if loss_fn is not None:
            inputs, targets = batch[:-1], batch[-1]
            return loss_fn(model(*inputs), targets)
        return output_loss(model(*batch))
    out = model(batch)
    return loss_fn(out) if loss_fn is not None else output_loss(out)


def output_loss(out: Any) -> Tensor:
    """The loss a model returned: ``out.loss`` (``out["loss"]``) or ``out`` itself, which must
    then be a scalar tensor (TypeError otherwise, asking for a loss_fn)."""
    loss = _own_loss(out)
    if loss is None:
        loss = out
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            "without loss_fn the model must return its loss (a scalar tensor, or an output with .loss); "
            f"got {type(out).__name__}: pass loss_fn"
        )
    return loss


def model_inputs(batch: Any, loss_fn: Callable | None) -> Any:
    """What the model is called with, for compress(sample=) (fed by :func:`call_model`):
    positional inputs without the targets (a tuple), or the batch itself (a tensor, or a dict
    of keyword arguments)."""
    if isinstance(batch, (tuple, list)):
        inputs = tuple(batch[:-1]) if loss_fn is not None else tuple(batch)
        return inputs[0] if len(inputs) == 1 else inputs
    return batch


