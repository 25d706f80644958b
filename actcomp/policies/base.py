"""What the compressed layers' neighbours keep: one policy per saved tensor of the step.

Compressing a layer frees only its own input; BatchNorm, activations, pooling and dropout keep
their own tensors, often the very activation the next layer compressed. :func:`actcomp.compress`
therefore also swaps these modules (same class-swap as compressed layers: objects, parameters,
state_dict keys and isinstance checks unchanged) for versions whose autograd Functions keep:

* ``bits``: ReLU, ReLU6, LeakyReLU, Hardtanh keep a 1-bit mask of where the input was inside
  their linear piece; Dropout its mask as bits. Exact.
* ``indices``: MaxPool keeps the argmax within each window in the smallest integer type
  (uint8 up to 256 window positions). Exact.
* ``nothing``: AvgPool / AdaptiveAvgPool (the backward needs only the shape); BatchNorm on
  running statistics (eval mode) with frozen weight. Exact.
* ``factors``: BatchNorm that uses batch statistics (train mode), or whose weight trains, keeps
  Tucker factors of its normalised input x_hat at eps (approximate; eps = 1 is exact); opt out
  with ``Neighbours(batchnorm="keep")``. LayerNorm and RMSNorm (torch's, timm's, transformers'
  LLaMA-family RMSNorm) keep Tucker factors of their normalised input with the explicit opt-in
  ``Neighbours(norm="factors")``, their input and per-row statistics with ``norm="exact"``; by
  default plain autograd (:mod:`actcomp.policies.norm`).
* ``bits<k>``: GELU, SiLU, Hardswish, Sigmoid, Tanh (and transformers' activation classes of
  the same functions) keep a k-bit code of their input's bucket and
  use a piecewise-constant derivative (approximate, explicit opt-in
  ``Neighbours(activations="bits4")``); by default they are left exact (plain autograd keeps
  their input or output).
* ``packed``: with ``Neighbours(generic=True)``, every other saved float tensor of at least
  ``threshold`` bytes inside the model's forward (attention products, softmax, LayerNorm,
  functional ops) is kept as Tucker factors at eps and rebuilt transiently during backward
  (:mod:`actcomp.policies.generic`).

Approximate policies apply only after the first compressed layer (execution order when
``compress`` is given ``sample=``, else module order); everywhere else the exact ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from actcomp.core.config import CompressionConfig
from actcomp.linalg.decompose import check_eps
from actcomp.linalg.numerics import NonFiniteActivationError
from actcomp.methods import InputLayout, method_class
from actcomp.core.lookup import inherited_registration
from actcomp.core.state import LayerState

ACTIVATION_POLICIES = ("exact", "bits1", "bits2", "bits4", "bits8")
BATCHNORM_POLICIES = ("factors", "input", "keep")
NORM_POLICIES = ("keep", "exact", "factors")


@dataclass(frozen=True)
class Neighbours:
    """How :func:`actcomp.compress` handles what the compressed layers' neighbours keep.

    ``activations``: smooth activations (GELU, SiLU, Hardswish, Sigmoid, Tanh): ``"exact"``
    (default: plain autograd) or ``"bits1"``/``"bits2"``/``"bits4"``/``"bits8"`` (a k-bit
    piecewise-constant derivative). ``batchnorm``: a BatchNorm whose statistics or weight
    train keeps ``"factors"`` of its normalised input (default), factors of its input
    (``"input"``: usually fewer bytes at the same eps) or its input itself (``"keep"``).
    ``norm``: LayerNorm / RMSNorm keep what plain autograd keeps (``"keep"``, default), their
    input and per-row statistics (``"exact"``: RMSNorm then keeps one tensor of the input's size,
    plain autograd two) or factors of their normalised input and those statistics (``"factors"``).
    ``generic``: pack every other large saved tensor as factors (opt-in). ``threshold``:
    bytes below which the generic packer keeps a tensor as it is. ``eps``: the eps of the
    approximate policies (None: the eps given to compress). ReLU-family masks, pooling
    indices, dropout bits and frozen eval-mode BatchNorm are exact and always on.
    """

    activations: str = "exact"
    batchnorm: str = "factors"
    norm: str = "keep"
    generic: bool = False
    threshold: int = 65536
    eps: float | None = None

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATION_POLICIES:
            raise ValueError(f"activations must be one of {', '.join(map(repr, ACTIVATION_POLICIES))}, got {self.activations!r}")
        if self.batchnorm not in BATCHNORM_POLICIES:
            raise ValueError(f"batchnorm must be one of {', '.join(map(repr, BATCHNORM_POLICIES))}, got {self.batchnorm!r}")
        if self.norm not in NORM_POLICIES:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORM_POLICIES))}, got {self.norm!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 0:
            raise ValueError(f"threshold must be a whole number of bytes >= 0, got {self.threshold!r}")
        if self.eps is not None:
            object.__setattr__(self, "eps", check_eps(self.eps))


Handler = Callable[[nn.Module, Tensor, "NeighbourState"], "Tensor | None"]


def _always(neighbours: Neighbours) -> bool:
    return True


def _never(module: nn.Module) -> bool:
    return False


@dataclass(frozen=True)
class NeighbourRegistration:
    """How one module type's neighbour policy runs.

    ``handler(module, x, state) -> y`` runs the module in a training step (None: its plain
    forward instead). ``applies(neighbours)``: whether :func:`actcomp.compress` attaches the
    policy at all under these :class:`Neighbours` settings (smooth activations: only when
    ``activations`` is not ``"exact"``). ``tradeable(module)``: whether :func:`actcomp.plan`
    may trade this module's accuracy for bytes (BatchNorm on batch statistics: its factors'
    eps is planned like a layer's).
    """

    module_type: type[nn.Module]
    handler: Handler
    applies: Callable[[Neighbours], bool] = _always
    tradeable: Callable[[nn.Module], bool] = _never


_REGISTRY: dict[type[nn.Module], NeighbourRegistration] = {}
_BY_NAME: dict[str, NeighbourRegistration] = {}  # "package.module.Class" -> registration (type not imported)
_RESOLVED: dict[type, "NeighbourRegistration | None"] = {}  # lookups, cleared on every registration


def register_neighbour(
    *module_types: "type[nn.Module] | str",
    applies: Callable[[Neighbours], bool] = _always,
    tradeable: Callable[[nn.Module], bool] = _never,
) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(module, x, state) -> y`` runs these module types in a training
    step, keeping what its policy says; returning None runs the plain forward instead.
    ``applies`` and ``tradeable``: see :class:`NeighbourRegistration`. A type may be given by
    its qualified name (``"transformers.activations.SiLUActivation"``) so that its package need
    not be imported; it is matched when a model uses it."""

    def decorate(handler: Handler) -> Handler:
        for module_type in module_types:
            if isinstance(module_type, str) and "." in module_type:
                _BY_NAME[module_type] = NeighbourRegistration(module_type, handler, applies, tradeable)  # type: ignore[arg-type]
                continue
            if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
                raise TypeError(f"register an nn.Module subclass or its qualified name 'package.module.Class', got {module_type!r}")
            _REGISTRY[module_type] = NeighbourRegistration(module_type, handler, applies, tradeable)
        _RESOLVED.clear()
        return handler

    return decorate


def _own_registration(cls: type) -> NeighbourRegistration | None:
    return _REGISTRY.get(cls) or (_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}") if _BY_NAME else None)


def neighbour_registration(module_type: type[nn.Module]) -> NeighbourRegistration | None:
    """The registration whose policy runs ``module_type``, or None. As for layers
    (:func:`actcomp.kernels.base.registration_for`): a compressed module's class maps to its
    base's, and a type inherits the registration of its nearest registered base class when it
    does not override that class's ``forward``; a subclass that overrides ``forward`` has no
    policy (its forward may compute something else than the policy's Function)."""
    module_type = getattr(module_type, "_actcomp_base", module_type)
    if module_type in _RESOLVED:
        return _RESOLVED[module_type]
    found = inherited_registration(module_type, _own_registration)
    _RESOLVED[module_type] = found
    return found


def neighbour_handler(module_type: type[nn.Module]) -> Handler | None:
    """The handler that runs ``module_type`` (see :func:`neighbour_registration`), or None."""
    registration = neighbour_registration(module_type)
    return registration.handler if registration is not None else None


def registered_neighbours() -> tuple["type[nn.Module] | str", ...]:
    """Every module type registered with a neighbour policy, in registration order (types
    registered by qualified name as those names)."""
    return (*_REGISTRY, *_BY_NAME)


def tradeable_neighbour(module: nn.Module) -> bool:
    """True when :func:`actcomp.plan` may trade ``module``'s policy (see
    :class:`NeighbourRegistration`)."""
    registration = neighbour_registration(type(module))
    return registration is not None and registration.tradeable(module)


@dataclass
class NeighbourState(LayerState):
    """The state of a neighbour module: its :class:`Neighbours` settings, whether approximate
    policies may apply to it (it runs after the first compressed layer), and the method used
    for its factors (``config``: hosvd at eps, unless compress's method tunes eps)."""

    neighbours: Neighbours = field(default_factory=Neighbours)
    approximate: bool = False
    kind: ClassVar[str] = "neighbour"

    def keep(self, policy: str, x: Tensor, kept_bytes: int) -> None:
        """Record what this call kept, under ``policy`` (shown as the stats' method)."""
        self.record(x, (), kept_bytes, method=policy)

    def factor(self, x: Tensor) -> Any:
        """Factors of x (batch mode first) by this state's method; stats recorded as
        ``factors``. x is this module's own temporary (x_hat, or its detached input), seen by no
        other layer, so it does not go through the cache of shared factors
        (:meth:`LayerState.compress`), which holds a tensor without grad_fn until the forward
        ends: every BatchNorm's x_hat would stay alive through the whole forward."""
        try:
            factors = self.compressor.compress(x, InputLayout(sample_modes=1), self.method_state)
        except NonFiniteActivationError:
            raise FloatingPointError(
                f"{self.describe()}: its input holds NaN or Inf, so no low-rank subspace exists; the training "
                "run has diverged (lower the learning rate, check the data) or use Neighbours(batchnorm='keep')"
            ) from None
        self.record(x, self.compressor.ranks(factors), factors.nbytes, method="factors")
        return factors


def factor_config(config: CompressionConfig, neighbours: Neighbours) -> CompressionConfig:
    """The settings of a neighbour's factors: compress's method when it tunes eps, unless it is
    a sampled method asking for truncated neighbours (``truncated_neighbours``), else the
    method it names for its neighbours (:attr:`Compressor.neighbour_method`); the neighbours'
    eps when set, else compress's."""
    compressor_class = method_class(config.method)
    own = compressor_class.knob == "eps" and not getattr(compressor_class, "truncated_neighbours", False)
    method = config.method if own else compressor_class.neighbour_method
    return CompressionConfig(method, neighbours.eps if neighbours.eps is not None else config.eps)
