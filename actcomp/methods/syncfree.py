"""Method ``"syncfree"``: Tucker factors with no host synchronisation in the steady state.

The GPU path (:mod:`actcomp.linalg.syncfree`): every mode carries a basis of fixed capacity, refined
each step by subspace iteration with CholeskyQR; the eps rank is chosen on the device and
applied as a mask, and the record of what each mode explained reaches the host without a wait
(one step late), where it grows a capacity that fell short. The guarantee of ``hosvd`` (each
truncation keeps eps of the energy it starts from) holds at every step without a recorded
shortfall; shortfalls are counted in the state. Factors are stored at capacity. The first step
and any change of input shape, dtype or device run the exact ``hosvd`` (with its syncs). The
per-layer state is a :class:`~actcomp.linalg.syncfree.SyncFreeState`; the sample modes of the layout
(batch, and a Linear's leading modes) get more iterations, their bases coming from unrelated
batches.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from actcomp.linalg.factors import Tucker
from actcomp.methods.base import Compressor, InputLayout, register_method
from actcomp.linalg.syncfree import SyncFreeState, syncfree_hosvd


@register_method
class SyncFree(Compressor):
    """Sequentially truncated Tucker factors from carried bases, ranks chosen on the device."""

    name = "syncfree"

    def new_state(self) -> SyncFreeState:
        return SyncFreeState()

    def compress(self, x: Tensor, layout: InputLayout, state: SyncFreeState) -> Tucker:
        return syncfree_hosvd(x, self.config.eps, state, sample_modes=layout.sample_modes)

    def ranks(self, factors: Tucker) -> tuple[int, ...]:  # type: ignore[override]
        return factors.ranks

    def state_dict(self, state: SyncFreeState | None) -> dict[str, Any]:
        return {} if state is None else state.state_dict()

    def load_state_dict(self, data: dict[str, Any]) -> SyncFreeState:
        return SyncFreeState.from_state_dict(data) if data else SyncFreeState()
