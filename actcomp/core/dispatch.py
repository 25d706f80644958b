"""One ``saved_tensors_hooks`` pair shared by everything in actcomp that watches or packs what
autograd saves.

PyTorch applies only the innermost ``torch.autograd.graph.saved_tensors_hooks`` context, so a
counter (:func:`actcomp.count_saved`, :func:`actcomp.measure`) and a packer (the generic packer
of :mod:`actcomp.policies.generic`) entered one inside the other would hide each other. Here they
register on one dispatcher instead: every saved tensor goes to the innermost packer willing to
take it (which may return a :class:`Packed` object in its place), then every observer sees the
original tensor and what is really kept. The torch context is entered once, by the outermost
user, and left by it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary


class Packed(Protocol):
    """What a packer keeps instead of a saved tensor."""

    policy: str

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors really kept (their storages are what the step holds)."""

    def unpack(self) -> Tensor:
        """The tensor autograd asked to keep (rebuilt, transiently, during backward)."""


Packer = Callable[[Tensor], "Packed | None"]
Observer = Callable[[Tensor, "Tensor | Packed"], None]


class _Dispatch(threading.local):
    def __init__(self) -> None:
        self.packers: list[Packer] = []
        self.observers: list[Observer] = []
        self.context: Any = None


_DISPATCH = _Dispatch()

#: tensor -> the policy an actcomp kernel marked it with (:func:`mark_kept`); weak-keyed, as
#: torch keeps such side data: an entry lives as long as its tensor, and nothing is set on it.
_MARKED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _pack(tensor: Tensor) -> Any:
    kept: Any = tensor
    for packer in reversed(_DISPATCH.packers):  # the innermost packer decides
        packed = packer(tensor)
        if packed is not None:
            kept = packed
            break
    for observer in list(_DISPATCH.observers):
        observer(tensor, kept)
    return kept


def _unpack(kept: Any) -> Tensor:
    return kept if isinstance(kept, Tensor) else kept.unpack()


def kept_tensors(kept: Any) -> tuple[Tensor, ...]:
    """The tensors a pack result holds: the tensor itself, or a Packed object's tensors."""
    return (kept,) if isinstance(kept, Tensor) else tuple(kept.tensors())


def kept_policy(tensor: Tensor, kept: Any) -> str:
    """The policy under which a saved tensor was kept: a packer's, the one an actcomp kernel
    marked its own saved tensors with (:func:`mark_kept`), or ``"plain"``."""
    if not isinstance(kept, Tensor):
        return kept.policy
    return _MARKED.get(tensor, "plain")


def marked_policy(tensor: Tensor) -> str | None:
    """The policy :func:`mark_kept` marked ``tensor`` with, or None when it is not marked."""
    return _MARKED.get(tensor)


def mark_kept(policy: str, *tensors: Tensor | None) -> None:
    """Mark tensors an actcomp kernel saves as already compact (factors, bits, indices, its
    weight): packers leave them alone, and measure reports them under ``policy``."""
    for t in tensors:
        if t is not None:
            _MARKED[t] = policy


@contextlib.contextmanager
def _entered(stack: list, item: Any) -> Iterator[None]:
    stack.append(item)
    outermost = _DISPATCH.context is None
    if outermost:
        _DISPATCH.context = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
        _DISPATCH.context.__enter__()
    try:
        yield
    finally:
        stack.remove(item)
        if outermost:
            context, _DISPATCH.context = _DISPATCH.context, None
            context.__exit__(None, None, None)


def observing(observer: Observer) -> contextlib.AbstractContextManager[None]:
    """Context manager: ``observer(tensor, kept)`` sees every tensor autograd saves inside it."""
    return _entered(_DISPATCH.observers, observer)


def packing(packer: Packer) -> contextlib.AbstractContextManager[None]:
    """Context manager: ``packer(tensor)`` may replace saved tensors by Packed objects inside it."""
    return _entered(_DISPATCH.packers, packer)
