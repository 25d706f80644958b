"""The generic packer (opt-in): every other large saved float tensor kept as Tucker factors.

Inside the model's forward (entered by a forward pre-hook on the root module, left by its
forward hook), each tensor autograd saves goes through :func:`actcomp.core.dispatch.packing`:
tensors actcomp's own kernels saved (factors, masks, indices, weights), the model's parameters
and buffers (and views of them), non-float tensors, tensors of fewer than 2 modes and tensors under ``threshold``
bytes are kept as they are; any other is replaced by its HOSVD factors at eps when they are
smaller (policy ``packed``). Backward rebuilds the tensor from the factors (transiently: one
full-size tensor at a time) and hands it to the op's own backward, so every op is covered
(attention products, softmax, LayerNorm, functional calls in ``forward``) at the price of
approximating what that op keeps. The same tensor saved by several ops is packed once.
Never worse than plain: at eps = 1 nothing is packed (full-rank factors outweigh the tensor),
and neither is a tensor whose storage this forward already keeps as it is (another op saved
it, or a view of it, unpacked: factors would be kept on top of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

from actcomp.linalg.decompose import NonFiniteActivationError, hosvd
from actcomp.linalg.factors import Tucker
from actcomp.core.dispatch import mark_kept, marked_policy, packing


@dataclass(frozen=True)
class PackedTensor:
    """A saved tensor kept as Tucker factors; :meth:`unpack` rebuilds it."""

    factors: Tucker
    dtype: torch.dtype
    policy: str = "packed"

    def tensors(self) -> tuple[Tensor, ...]:
        return self.factors.tensors()

    def unpack(self) -> Tensor:
        return self.factors.reconstruct().to(self.dtype)


#: tensor -> ((its version, eps), what it was packed as): the same tensor saved by several ops
#: is packed once. Weak-keyed, as torch keeps such side data: an entry lives as long as its
#: tensor, and nothing is set on the tensor itself.
_PACKED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


class GenericPacker:
    """The pack function of the generic policy for one model (see the module doc)."""

    def __init__(self, eps: float, threshold: int) -> None:
        self.eps, self.threshold = eps, threshold
        self.active = True  # False inside actcomp.suspended
        # storages of the model's parameters and buffers, set per forward: a view of a weight
        # (w.t(), in_proj_weight.chunk(3)) is saved by plain autograd at no cost and never packed
        self.fixed: set[int] = set()
        # storages saved as they are in this forward (declined, or marked by a kernel): packing
        # another view of one would keep factors on top of the storage
        self.kept: set[int] = set()

    def __call__(self, t: Tensor) -> PackedTensor | None:
        packed = self._pack(t)
        if packed is None:
            self.kept.add(t.untyped_storage().data_ptr())
        return packed

    def _pack(self, t: Tensor) -> PackedTensor | None:
        if marked_policy(t) is not None or isinstance(t, nn.Parameter):
            return None
        if not t.is_floating_point() or t.ndim < 2 or t.numel() == 0 or t.numel() * t.element_size() < self.threshold:
            return None
        if self.eps >= 1.0:
            return None  # full-rank factors outweigh the tensor (never worse than plain)
        cached = _PACKED.get(t)
        if cached is not None and cached[0] == (t._version, self.eps):
            return cached[1]
        storage = t.untyped_storage().data_ptr()
        if storage in self.fixed or storage in self.kept:
            return None  # a weight's view, or a storage this forward keeps anyway: factors would add to it
        try:
            factors = hosvd(t, self.eps)
        except NonFiniteActivationError:
            return None  # NaN/Inf: keep it; the compressed layers report a diverged run by name
        if factors.nbytes >= t.numel() * t.element_size():
            return None
        mark_kept("packed", *factors.tensors())
        packed = PackedTensor(factors, t.dtype)
        _PACKED[t] = ((t._version, self.eps), packed)
        return packed


class _Session:
    """Forward pre-hook and forward hook entering and leaving the packing context."""

    def __init__(self, packer: GenericPacker) -> None:
        self.packer = packer
        self.contexts: list = []

    def enter(self, module: nn.Module, args: object) -> None:
        engaged = self.packer.active and module.training and torch.is_grad_enabled()
        context = packing(self.packer) if engaged else None
        if context is not None:
            tensors = (*module.parameters(), *module.buffers())
            self.packer.fixed = {t.untyped_storage().data_ptr() for t in tensors}
            if not self.contexts or all(c is None for c in self.contexts):
                self.packer.kept = set()  # the outermost packed forward begins
            context.__enter__()
        self.contexts.append(context)

    def leave(self, module: nn.Module, args: object, output: object) -> None:
        context = self.contexts.pop() if self.contexts else None
        if context is not None:
            context.__exit__(None, None, None)


def attach_generic(model: nn.Module, eps: float, threshold: int) -> None:
    """Pack large saved tensors of ``model``'s training forwards (replacing earlier settings)."""
    detach_generic(model)
    session = _Session(GenericPacker(eps, threshold))
    model.register_forward_pre_hook(session.enter)
    model.register_forward_hook(session.leave, always_call=True)


def _sessions(hooks: dict) -> list:
    return [key for key, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), _Session)]


def detach_generic(model: nn.Module) -> None:
    """Remove the generic packer from ``model`` (no-op when absent). The hooks are found by
    their owner, not by handles, so that copies and unpickled models detach their own."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in _sessions(hooks):
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)


def generic_packer(model: nn.Module) -> GenericPacker | None:
    """The generic packer attached to ``model``, or None."""
    keys = _sessions(model._forward_pre_hooks)
    return model._forward_pre_hooks[keys[0]].__self__.packer if keys else None
