"""The public per-layer state of a compressed module: settings, last stats, method state.

``actcomp.layer_state(module)`` returns it for a compressed module (None otherwise). It is the
one place where what a layer is asked to do (``config``), what it did in its last training
forward (``last``) and what its method carries between steps (``method_state``, e.g. asi's
tracked subspaces) live; measure, finetune, the optimizers and the tests read it there.
``state_dict()`` gives it as tensors, numbers and dicts (loadable with ``weights_only=True``).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

from actcomp.core.config import CompressionConfig, LayerStats
from actcomp.linalg.decompose import NonFiniteActivationError
from actcomp.linalg.factors import Factors
from actcomp.methods.base import Compressor, InputLayout


#: input tensor -> ((version, method, settings, layout), its factors): an activation given to
#: several layers is factored once (:meth:`LayerState.compress`). Weak-keyed, as torch keeps
#: such side data: an entry lives as long as its tensor, and nothing is set on the tensor.
_FACTORS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


class _ForwardScope(threading.local):
    """The training forward of a compressed model in progress (``depth`` > 0): inside it an
    input without a grad_fn (a frozen model's activations, e.g. under LoRA, where nothing
    before the adapters is trained) given to several layers is factored once too; those
    entries (``leaves``: id -> (tensor, key, factors)) are dropped when the outermost forward
    ends, so no step's factors outlive it through a tensor reused across steps."""

    def __init__(self) -> None:
        self.depth = 0
        self.leaves: dict[int, tuple[Tensor, Any, Factors]] = {}


_SCOPE = _ForwardScope()


def enter_forward() -> None:
    """A compressed model's forward begins (see :class:`_ForwardScope`)."""
    _SCOPE.depth += 1


def leave_forward() -> None:
    """A compressed model's forward ends; the outermost one drops the leaf entries."""
    _SCOPE.depth = max(0, _SCOPE.depth - 1)
    if _SCOPE.depth == 0:
        _SCOPE.leaves.clear()


def _cached_factors(x: Tensor) -> tuple[Any, Factors] | None:
    if x.grad_fn is not None:
        return _FACTORS.get(x)
    entry = _SCOPE.leaves.get(id(x)) if _SCOPE.depth else None
    return entry[1:] if entry is not None and entry[0] is x else None


def _cache_factors(x: Tensor, key: Any, factors: Factors) -> None:
    if x.grad_fn is not None:
        _FACTORS[x] = (key, factors)
    elif _SCOPE.depth:
        _SCOPE.leaves[id(x)] = (x, key, factors)


def trains_weight(module: nn.Module) -> bool:
    """True when the layer is trained: a parameter of its own other than the bias (its
    weight, or what a computed weight is made of) requires grad. Plain autograd then keeps
    the layer's input for dW; a frozen layer keeps nothing of it."""
    return any(p.requires_grad for name, p in module.named_parameters(recurse=False) if name != "bias")


def plain_kept_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes plain autograd keeps of the input x of a layer that runs its own forward: all of
    x when the layer is trained (:func:`trains_weight`), else none."""
    return x.numel() * x.element_size() if trains_weight(module) else 0


class KernelNotRunWarning(UserWarning):
    """A layer selected for compression whose compressed kernel does not (or cannot) run: what
    it would keep is kept by plain autograd, so it must not be counted as compressed."""


@dataclass(frozen=True)
class NotRunStats(LayerStats):
    """``stats()`` entry of a compressed layer whose kernel did not run in its model's last
    training forward: it kept nothing itself (``kept_bytes`` 0), what its input costs is kept
    by whatever ran instead (its parent's ops; see ``measure``), and ``ratio`` is NaN, never a
    compression ratio. ``reason`` says why, in words."""

    reason: str = ""

    @property
    def ratio(self) -> float:
        return float("nan")


@dataclass(frozen=True)
class BackwardRecord:
    """What a compressed layer's backward has at hand: its state, the family's name and
    geometry, the factors of its input, the output gradient dY (after the method's filter),
    the input's shape and the weight's shape (in the family's layout)."""

    state: "LayerState"
    family: str
    geometry: Any
    factors: Factors
    grad_out: Tensor
    input_shape: torch.Size
    weight_shape: torch.Size


@dataclass
class LayerState:
    """Attached to a compressed module: its qualified name and type, its settings, the method
    object, the method's carried state, its last stats, and whether it is active.

    ``active`` is False inside :func:`actcomp.suspended` (the layer then runs plain autograd
    and its state is left as it is). ``runs`` counts the training forwards the kernel ran,
    ``calls`` every call of the module's forward. ``missed`` counts the training forwards of
    the model given to ``compress`` in which the kernel did not run, ``ran_last`` whether it ran
    in the latest (None before the first); the first miss warns (:class:`KernelNotRunWarning`).
    ``shared``: the last forward reused factors another layer had made of the same input (its
    stats then say 0 bytes kept: the factors are counted once, by the first layer).
    ``observers`` are called in the layer's backward with a :class:`BackwardRecord` (the
    factors and the output gradient), e.g. by optimizers that build curvature statistics from
    the factors instead of the input; they must not keep the record beyond the call.
    """

    name: str
    layer_type: str
    config: CompressionConfig
    last: LayerStats | None = None
    method_state: Any = None
    active: bool = True
    runs: int = 0
    calls: int = 0
    missed: int = 0
    ran_last: bool | None = None
    not_run_reason: str = field(default="", repr=False)
    warned: bool = field(default=False, repr=False)
    shared: bool = False
    observers: list[Callable[["BackwardRecord"], None]] = field(default_factory=list, repr=False, compare=False)
    compressor: Compressor = field(init=False, repr=False)
    #: What kind of module the state is attached to ("layer": a compressed kernel; a
    #: neighbour policy's state says "neighbour"); written by :meth:`state_dict`.
    kind: ClassVar[str] = "layer"

    def __post_init__(self) -> None:
        self.compressor = self.config.compressor()
        if self.method_state is None:
            self.method_state = self.compressor.new_state()

    @property
    def tracker(self) -> Any:
        """The method's carried state (for ``asi`` a :class:`~actcomp.linalg.decompose.SubspaceTracker`)."""
        return self.method_state

    @tracker.setter
    def tracker(self, value: Any) -> None:
        self.method_state = value

    def describe(self) -> str:
        return f"layer '{self.name}' ({self.layer_type})"

    def not_run(self, reason: str) -> None:
        """Record that the model's training forward ran without this layer's kernel; warn the
        first time (``reason``: why, in words)."""
        self.missed += 1
        self.ran_last = False
        self.not_run_reason = reason
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"{self.describe()} is compressed but its kernel did not run in a training forward: {reason}. "
                "Plain autograd kept what it needed, so it is not counted as compressed (stats() says 'not run'); "
                "leave it out of compress() or call it through its own forward",
                KernelNotRunWarning,
                stacklevel=4,
            )

    def stats(self) -> LayerStats | None:
        """What the layer kept in the model's latest training forward: ``last``, or a
        :class:`NotRunStats` when its kernel did not run in it; None before any."""
        if self.ran_last is False:
            return NotRunStats(
                name=self.name, layer_type=self.layer_type, method="not run", eps=self.config.eps,
                input_shape=(), ranks=(), kept_bytes=0, input_bytes=0, reason=self.not_run_reason,
            )
        return self.last

    def configure(self, config: CompressionConfig) -> None:
        """New settings; the carried state is kept when the method stays the same."""
        same = config.method == self.config.method
        self.config = config
        self.compressor = config.compressor()
        if not same:
            self.method_state = self.compressor.new_state()

    def compress(self, x: Tensor, layout: InputLayout) -> Factors:
        """The method's factors of x, with the stats recorded; NaN/Inf in x raise
        FloatingPointError naming the layer (a non-finite activation has no subspace, and a
        silent fallback would hide a diverged run and break the planned memory)."""
        key = (x._version, type(self.compressor), self.config, layout)
        cached = _cached_factors(x)
        if cached is not None and cached[0] == key:
            factors = cached[1]
            self.record(x, self.compressor.ranks(factors), 0)  # kept once, by the first layer
            self.shared = True
            return factors
        try:
            factors = self.compressor.compress(x, layout, self.method_state)
        except NonFiniteActivationError:
            raise FloatingPointError(
                f"{self.describe()}: its input holds NaN or Inf, so no low-rank subspace exists; "
                "the training run has diverged (lower the learning rate, check the data) or use "
                "method='none' for this layer"
            ) from None
        self.record(x, self.compressor.ranks(factors), factors.nbytes)
        self.shared = False
        if self.method_state is None:
            # An activation of this step given to several layers (a residual block's conv and
            # its downsample, attention's q/k/v projections, LoRA's A of q and v) is factored
            # once; stateful methods (asi) are never cached, and an input without a grad_fn
            # only within one forward of a compressed model (it may be reused across steps).
            _cache_factors(x, key, factors)
        return factors

    def record(self, x: Tensor, ranks: tuple[int, ...], kept_bytes: int, method: str | None = None) -> None:
        """Stats of this training forward: the input's shape and bytes, ranks, bytes kept
        (``method``: what to report as the method, by default the configured one)."""
        self.runs += 1
        self.ran_last = True
        self.last = LayerStats(
            name=self.name,
            layer_type=self.layer_type,
            method=method or self.config.method,
            eps=self.config.eps,
            input_shape=tuple(x.shape),
            ranks=tuple(ranks),
            kept_bytes=kept_bytes,
            input_bytes=x.numel() * x.element_size(),
        )

    def state_dict(self) -> dict[str, Any]:
        """Settings and carried method state as plain data (tensors, numbers, strings, dicts)."""
        return {
            "kind": self.kind,
            "method": self.config.method,
            "eps": self.config.eps,
            **dict(self.config.method_settings),  # the method's own settings (gradient_filter: patch)
            "method_state": self.compressor.state_dict(self.method_state),
        }

    def load_state_dict(self, data: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave (settings and the method's carried state)."""
        self.configure(CompressionConfig.from_dict(data))
        self.method_state = self.compressor.load_state_dict(data.get("method_state", {}))
