"""What a compressed layer is asked to do (CompressionConfig) and what it did (LayerStats)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from actcomp.linalg.numerics import check_eps
from actcomp.methods import Compressor, method_class


@dataclass(frozen=True, init=False)
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

    A method's own settings (its :attr:`~actcomp.methods.Compressor.own_settings`, such as
    gradient_filter's ``patch``, default 4) are keywords: ``CompressionConfig("gradient_filter",
    patch=2)``. Each is checked by the method, stored with the method's defaults for those not
    given (``method_settings``, (name, value) pairs in declaration order) and read back as an
    attribute (``config.patch``). A setting the method does not declare is a ValueError naming
    the method and its settings. ``method_settings=`` (a mapping or pairs) gives them at once,
    as :func:`dataclasses.replace` does.
    """

    method: str = "hosvd"
    eps: float = 0.99
    method_settings: tuple[tuple[str, Any], ...] = ()

    def __init__(
        self,
        method: str = "hosvd",
        eps: float = 0.99,
        *,
        method_settings: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
        **settings: Any,
    ) -> None:
        declared = method_class(method).own_settings  # ValueError naming the registered methods
        eps = check_eps(eps)
        given = {**dict(method_settings), **settings}
        names = [s.name for s in declared]
        for name in given:
            if name not in names:
                raise ValueError(f"method {method!r} has no setting {name!r} (its settings: {', '.join(['eps', *names])})")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "eps", eps)
        object.__setattr__(
            self, "method_settings", tuple((s.name, s.check(given[s.name]) if s.name in given else s.default) for s in declared)
        )

    def __getattr__(self, name: str) -> Any:
        # only called for names that are not attributes: the method's own settings
        if name.startswith("__"):
            raise AttributeError(name)
        for key, value in self.__dict__.get("method_settings", ()):
            if key == name:
                return value
        raise AttributeError(f"{type(self).__name__} of method {self.__dict__.get('method')!r} has no setting {name!r}")

    def __repr__(self) -> str:
        settings = "".join(f", {name}={value!r}" for name, value in self.method_settings)
        return f"{type(self).__name__}(method={self.method!r}, eps={self.eps!r}{settings})"

    def as_dict(self) -> dict[str, Any]:
        """``method``, ``eps`` and the method's own settings, as one flat dict (JSON-ready)."""
        return {"method": self.method, "eps": self.eps, **dict(self.method_settings)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompressionConfig":
        """The config a record holds (:meth:`as_dict`, a layer's ``state_dict``): ``method``,
        ``eps`` and the settings that method declares; other keys are ignored (records written
        before methods declared their settings hold ``patch`` whatever the method)."""
        names = {s.name for s in method_class(data["method"]).own_settings}
        return cls(data["method"], data["eps"], **{k: v for k, v in data.items() if k in names})

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
