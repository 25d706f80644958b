"""Compression methods, registered by name: how a layer's input becomes what its backward keeps.

A method is a small :class:`Compressor` subclass in its own file here, registered with
:func:`register_method`. It turns the input x of a layer into factors (a ``Tucker``, a
``LowRank`` or a ``PatchMeans``), says which setting the planner may tune (``knob``), whether it
is exact at eps = 1 and whether its weight gradient is plain autograd's on
``factors.reconstruct()`` (the two properties the conformance test checks), and may carry
per-layer state between steps (``new_state``, e.g. asi's tracked subspaces). The layer family
(actcomp.kernels) tells the method how the input is laid out (:class:`InputLayout`): how many
leading modes are samples for the weight gradient, and its spatial modes.

Adding a method is one file in this package, imported by its __init__.py, plus its row in the
conformance test's ``METHOD_ROWS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from torch import Tensor

from actcomp.linalg.factors import Factors

if TYPE_CHECKING:
    from actcomp.core.config import CompressionConfig


@dataclass(frozen=True)
class InputLayout:
    """How a layer family reads its input x: what a method needs to know to factor it.

    ``sample_modes``: the leading modes the weight gradient sums over as samples (1 for a
    convolution's batch mode, every leading mode for Linear); ``stride``: a convolution's
    stride per spatial mode (empty when the layer has no spatial modes).
    """

    sample_modes: int
    stride: tuple[int, ...] = ()

    @property
    def spatial(self) -> int:
        """Number of spatial modes (those after batch and channel)."""
        return len(self.stride)


#: Keywords of CompressionConfig that are not method settings.
_RESERVED_SETTING_NAMES = frozenset({"method", "eps", "method_settings"})


@dataclass(frozen=True)
class Setting:
    """A setting a method declares for itself (beyond ``eps``, which every method takes).

    ``name``: the keyword of :class:`~actcomp.CompressionConfig` (``CompressionConfig(
    "gradient_filter", patch=2)``, read back as ``config.patch``) and of the command line
    option ``--name`` (underscores as dashes); ``default``: its value when not given (the
    command line parses the option with ``type(default)``); ``check``: returns the value to
    store, or raises ValueError saying what is wrong; ``help``: one line for ``--help``.
    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    help: str

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name in _RESERVED_SETTING_NAMES:
            raise ValueError(f"a method setting needs an identifier other than {sorted(_RESERVED_SETTING_NAMES)} as its name, got {self.name!r}")


class Compressor:
    """Base class of a compression method. Subclasses set ``name`` and implement ``compress``.

    ``settings``: the fields of :class:`~actcomp.CompressionConfig` the method reads.
    ``knob``: the setting :func:`actcomp.plan` tunes per layer (``"eps"``), or None when the
    method has nothing to tune. ``exact_at_one``: at eps = 1 the gradients equal plain
    autograd's. ``reconstructs``: the weight gradient is plain autograd's applied to
    ``factors.reconstruct()`` (and dX, db stay exact). ``neighbour_method``: the method
    that factors its neighbours' tensors (BatchNorm's x_hat) when ``knob`` is not eps (a method
    that tunes eps factors them itself). ``own_settings``: the settings the method declares
    for itself (:class:`Setting`: name, default, check, help); :class:`~actcomp.CompressionConfig`
    takes them as keywords and refuses any other, and the command line offers each as an option.
    """

    name: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ("eps",)
    knob: ClassVar[str | None] = "eps"
    exact_at_one: ClassVar[bool] = True
    reconstructs: ClassVar[bool] = True
    neighbour_method: ClassVar[str] = "hosvd"
    own_settings: ClassVar[tuple[Setting, ...]] = ()

    def __init__(self, config: "CompressionConfig") -> None:
        self.config = config

    def setting(self) -> str:
        """The settings as shown in a compressed module's repr: ``eps=0.8``."""
        return f"eps={self.config.eps:g}"

    def runs_plain(self, layout: InputLayout) -> bool:
        """True when layers of this layout run plain autograd under this method (no kernel)."""
        return False

    def new_state(self) -> Any:
        """Per-layer state carried from step to step (None: the method is stateless)."""
        return None

    def compress(self, x: Tensor, layout: InputLayout, state: Any) -> Factors:
        """The factors of x the layer keeps for backward. Runs under no_grad, in float32
        (float64 for float64 input), returns tensors in x's dtype that own their storage."""
        raise NotImplementedError

    def ranks(self, factors: Factors) -> tuple[int, ...]:
        """What :class:`~actcomp.LayerStats` reports as ranks for these factors."""
        return ()

    def filter_grad(self, grad_out: Tensor, layout: InputLayout) -> Tensor:
        """The output gradient the layer's dX and dW use (identity but for Gradient Filter)."""
        return grad_out

    def state_dict(self, state: Any) -> dict[str, Any]:
        """``state`` as tensors, numbers and dicts of them (loadable with weights_only=True)."""
        return {}

    def load_state_dict(self, data: dict[str, Any]) -> Any:
        """The inverse of :meth:`state_dict`: a state object rebuilt from its dict."""
        return self.new_state()


_METHODS: dict[str, type[Compressor]] = {}


def register_method(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make ``cls`` available as ``CompressionConfig(method=cls.name)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_METHODS)


def method_class(name: str) -> type[Compressor]:
    """The Compressor class registered as ``name``; ValueError listing the others if none."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(map(repr, _METHODS))}, got {name!r}") from None
