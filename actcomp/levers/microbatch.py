"""Micro-batching with gradient accumulation: one step's batch run as k smaller ones.

Every activation term of the step (what autograd keeps, the forward's transients, the gradient
of the current activation) is proportional to the batch; running k chunks one after the other,
each forward followed at once by its backward, divides them by k while the parameter
gradients accumulate into the same ``.grad``. With per-sample losses l_i, the full batch's mean
loss L = (1/N) sum_i l_i = sum_c (n_c / N) L_c, L_c the mean over chunk c of n_c samples, so
backpropagating (n_c / N) L_c per chunk accumulates exactly grad L. That holds for every model
whose output for a sample does not depend on the other samples: BatchNorm in train mode
normalises by the statistics of the batch it sees, a chunk's, so its gradients (and its running
statistics) differ; :func:`freeze_batchnorm` (eval-mode statistics, the usual fine-tuning
setting) makes it exact again.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from actcomp.levers.step_in_backward import StepInBackward

#: models already warned that their BatchNorm sees the chunks' statistics
_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim > 0 else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    sizes = {s for s in (_batch_size(v) for v in values) if s is not None}
    if len(sizes) > 1:
        raise ValueError(f"the batch's tensors have different sizes along dim 0: {sorted(sizes)}")
    return sizes.pop() if sizes else None


def split_batch(batch: Any, micro_batches: int) -> list[Any]:
    """Split ``batch`` (a tensor, a tuple / list of them, or a dict of them such as a Hugging
    Face ``BatchEncoding``, nested freely) along dim 0 into ``micro_batches`` chunks whose
    sizes differ by at most one; 0-d tensors and non-tensors are passed to every chunk."""
    size = _batch_size(batch)
    if size is None:
        raise ValueError("the batch holds no tensor with a batch dimension (dim 0) to split")
    if not 1 <= micro_batches <= size:
        raise ValueError(f"micro_batches must be between 1 and the batch size {size}, got {micro_batches}")
    bounds = [size * i // micro_batches for i in range(micro_batches + 1)]
    return [_slice(batch, a, b) for a, b in zip(bounds, bounds[1:])]


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.ndim > 0 else batch
    if isinstance(batch, Mapping):
        items = {k: _slice(v, start, stop) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:  # a Mapping type not built from a dict
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_slice(v, start, stop) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, start, stop) for v in batch)
    return batch


def batch_statistics_modules(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules of ``model`` that normalise by the statistics of the batch
    they see (train mode, or no running statistics): those that make micro-batching inexact."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None or m.running_var is None)
    ]


@contextlib.contextmanager
def freeze_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: every BatchNorm of ``model`` in eval mode (running statistics, not
    updated) inside it, its previous mode restored after. The affine parameters still train.
    A BatchNorm then computes y = gamma (x - mu_run) / sigma_run + beta per sample, so the
    micro-batched gradient equals the full batch's exactly; in train mode each chunk would be
    normalised by its own mean and variance instead (other outputs, gradients and running
    statistics)."""
    modes = [(m, m.training) for m in model.modules() if isinstance(m, _BatchNorm)]
    for m, _ in modes:
        m.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


def microbatch_step(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    micro_batches: int,
    *,
    weight_fn: Callable[[Any], float] | None = None,
    in_backward: StepInBackward | None = None,
) -> Tensor:
    """Forward and backward ``batch`` as ``micro_batches`` chunks; return the full batch's loss.

    ``loss_fn(model, chunk)`` returns the mean loss over the chunk (e.g. ``lambda m, b:
    F.cross_entropy(m(b[0]), b[1])`` or ``lambda m, b: m(**b).loss``). Chunk c's loss L_c is
    backpropagated scaled by w_c / W (w_c its size along dim 0, or ``weight_fn(chunk)``, e.g.
    its count of non-padding tokens for a token-mean loss; W = sum_c w_c), so the gradients
    accumulated into ``.grad`` (add to what is there; zero them as for a plain backward) are
    those of sum_c (w_c / W) L_c, the full batch's mean loss: exact, uneven chunks included, for
    every model without batch statistics. Every activation term of the step is divided by
    about k = ``micro_batches`` (one chunk's graph is alive at a time) at the price of k smaller
    forwards and backwards. A BatchNorm using batch statistics sees each chunk's statistics
    instead of the batch's (not exact; warned once per model): wrap the call in
    :func:`freeze_batchnorm`. With ``in_backward`` (from
    :func:`~actcomp.levers.optimizer_in_backward`), every chunk but the last runs inside its
    ``accumulating()``, so the step in backward runs once, on the accumulated gradient.
    """
    chunks = split_batch(batch, micro_batches)
    if micro_batches > 1 and model not in _WARNED and (names := batch_statistics_modules(model)):
        _WARNED.add(model)
        warnings.warn(
            f"microbatch_step: {len(names)} BatchNorm module(s) ({names[0]}, ...) use batch statistics, so each of the "
            f"{micro_batches} chunks is normalised by its own: gradients and running statistics differ from the full "
            "batch's. Wrap the step in actcomp.levers.freeze_batchnorm(model) for eval-mode statistics (exact).",
            stacklevel=2,
        )
    weights = [float(weight_fn(c)) if weight_fn is not None else float(_batch_size(c)) for c in chunks]
    total_weight = sum(weights)
    if total_weight <= 0:
        raise ValueError("the chunks' weights sum to zero: nothing to average over")
    total = None
    last_index = max(i for i, w in enumerate(weights) if w != 0)
    for i, (chunk, weight) in enumerate(zip(chunks, weights)):
        if weight == 0:  # e.g. a chunk without counted tokens: it adds nothing to the mean
            continue
        last = i == last_index
        context = in_backward.accumulating() if in_backward is not None and not last else contextlib.nullcontext()
        loss = loss_fn(model, chunk)
        scaled = loss * (weight / total_weight)
        with context:
            scaled.backward()
        part = scaled.detach()
        total = part if total is None else total + part
        del loss, scaled
    assert total is not None
    return total
