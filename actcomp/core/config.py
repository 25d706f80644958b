"""What a compressed layer is asked to do (CompressionConfig) and what it did (LayerStats)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from actcomp.linalg.decompose import check_eps
from actcomp.methods import Compressor, method_class

@dataclass(frozen=True)
class CompressionConfig:
    """How the activations of the selected layers are kept for backward.

    ``method``: ``"hosvd"`` keeps a Tucker factorisation (core and one factor per mode, each
    mode's rank the smallest explaining a fraction ``eps`` of the activation's energy
    ||X||_F^2); ``"asi"`` the same Tucker form with the non-batch modes' subspaces carried from
    step to step and refined by one subspace iteration (each mode still explains at least
    ``eps``, ranks adapt); ``"svd"`` keeps a rank-k factorisation of the batch-mode unfolding (rows of all
    leading dimensions for Linear), k chosen the same way; ``"gradient_filter"`` is the
    baseline of Yang et al. (CVPR 2023): convolutions keep their input averaged over
    ``patch`` x ``patch`` regions and use an output gradient averaged over patches (eps
    unused; Linear layers stay exact); ``"none"`` runs plain autograd, for comparisons.
    ``eps`` is in (0, 1]; at 1 the factors are exact. Methods are a registry
    (:mod:`actcomp.methods`): ``method`` may name any registered one.
    """

    method: str = "hosvd"
    eps: float = 0.8
    patch: int = 4

    def __post_init__(self) -> None:
        method_class(self.method)  # ValueError naming the registered methods
        object.__setattr__(self, "eps", check_eps(self.eps))
        if isinstance(self.patch, bool) or not isinstance(self.patch, int) or self.patch < 1:
            raise ValueError(f"patch must be a whole number >= 1 (the gradient filter's r), got {self.patch!r}")

    def compressor(self) -> Compressor:
        """The method object these settings describe."""
        return method_class(self.method)(self)


@dataclass(frozen=True)
class LayerStats:
    """What one compressed layer kept in its last training forward.

    ``ranks`` has one entry per mode of the input for ``hosvd`` (batch first) and one entry,
    the rank of the batch-mode unfolding, for ``svd``; it is empty for ``none`` and for a layer
    whose weight is frozen (no activation is needed then). ``kept_bytes`` is what the layer
    keeps for its weight gradient (the factors' bytes), ``input_bytes`` what plain autograd
    would have kept (the input itself).
    """

    name: str
    layer_type: str
    method: str
    eps: float
    input_shape: tuple[int, ...]
    ranks: tuple[int, ...]
    kept_bytes: int
    input_bytes: int

    @property
    def ratio(self) -> float:
        """kept_bytes / input_bytes (0 when the input was empty)."""
        return self.kept_bytes / self.input_bytes if self.input_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}
