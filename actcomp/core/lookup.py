"""One rule for looking a module type up in a registry keyed by class (layers and neighbours)."""

from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

R = TypeVar("R")


def inherited_registration(module_type: type[nn.Module], own: Callable[[type], R | None]) -> R | None:
    """The registration of ``module_type``'s nearest registered class in its MRO (``own(cls)``
    gives a class's own registration or None), provided ``module_type`` runs that class's
    ``forward``: a subclass that keeps its base's forward inherits the base's registration
    (torch's ``NonDynamicallyQuantizableLinear`` runs as ``Linear``); one that overrides it
    gets None (its forward may compute something else than the registered code)."""
    for cls in module_type.__mro__:
        registration = own(cls)
        if registration is not None:
            if cls is module_type or getattr(module_type, "forward", None) is getattr(cls, "forward", None):
                return registration
            return None
    return None
