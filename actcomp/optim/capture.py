"""Where an optimizer gets a layer's curvature statistics: the factors, or the plain hooks.

A compressed layer whose weight is trained runs actcomp's autograd Function, whose backward
calls the layer state's observers with a :class:`~actcomp.core.state.BackwardRecord` (the input's
factors and dY); an optimizer builds its statistics there and the input is never kept. A layer
that runs plain autograd instead (not compressed, inside :func:`actcomp.suspended`, a method
that leaves it exact, a frozen weight) goes through a forward hook, as the stock optimizer's
code does. :class:`LayerTap` decides per forward which of the two applies.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from actcomp.attach import layer_state
from actcomp.kernels.function import CompressedOp
from actcomp.core.state import BackwardRecord


def ran_compressed(module: nn.Module, output: Any) -> bool:
    """Whether ``output`` comes from the compressed Function with a trained weight, i.e.
    whether the layer's backward will call its observers (a squeeze after the Function, for
    an unbatched input, is looked through)."""
    weight = getattr(module, "weight", None)
    if not isinstance(output, Tensor) or weight is None or not weight.requires_grad:
        return False
    node = output.grad_fn
    for _ in range(2):
        if node is None:
            return False
        if isinstance(node, CompressedOp._backward_cls):
            return True
        node = node.next_functions[0][0] if node.next_functions else None
    return False


class LayerTap:
    """Feeds one layer's statistics to an optimizer.

    ``on_factors(module, record)`` is called in the compressed backward (it must not keep the
    record); ``on_plain_forward(module, inputs, output)`` is called as a forward hook after
    every forward that did not run the compressed Function with a trained weight. The observer
    is attached to the layer's state on the first compressed forward, so a layer compressed
    after the optimizer was made is served from its factors too. :meth:`remove` detaches both.
    """

    def __init__(
        self,
        module: nn.Module,
        on_factors: Callable[[nn.Module, BackwardRecord], None],
        on_plain_forward: Callable[[nn.Module, tuple, Any], None],
    ) -> None:
        self.module = module
        self.on_factors = on_factors
        self.on_plain_forward = on_plain_forward
        self._handle = module.register_forward_hook(self._forward)

    def _observer(self, record: BackwardRecord) -> None:
        self.on_factors(self.module, record)

    def _forward(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        state = layer_state(module)
        if state is not None and ran_compressed(module, output):
            if self._observer not in state.observers:
                state.observers.append(self._observer)
            return
        self.on_plain_forward(module, inputs, output)

    def remove(self) -> None:
        """Detach the forward hook and the observer."""
        self._handle.remove()
        state = layer_state(self.module)
        if state is not None and self._observer in state.observers:
            state.observers.remove(self._observer)
