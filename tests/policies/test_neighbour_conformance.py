"""Every registered neighbour type x each policy setting, driven by the neighbour registry.

Like tests/test_conformance.py for layers: each type registered with ``register_neighbour``
has settings rows (a module factory, an input shape, the :class:`actcomp.Neighbours` settings
and what the policy promises to keep). The module runs after a compressed layer (so that
approximate policies apply) at eps = 1 in float64, and for every row:

* exact policies: output, input gradient and parameter gradients equal plain autograd's;
* the bytes autograd keeps for the module (``actcomp.count_saved``, parameters apart) are what
  the policy promises: ``bits`` ceil(numel / 8), ``bits<k>`` ceil(numel k / 8), ``indices`` one
  small integer per output element, ``nothing`` none, ``factors`` the factors' bytes (the
  stats' ``kept_bytes``), ``input`` x itself (stats' policy ``plain``, never more than plain
  autograd), ``plain`` what plain autograd keeps; BatchNorm adds its per-channel
  mean and 1/sigma, LayerNorm / RMSNorm their per-row mean and 1/sigma (RMSNorm: 1/rms);
* the stats the policy records say the same bytes.

The first test fails until a newly registered type has rows; smooth activations, BatchNorm and
LayerNorm / RMSNorm get one row per value of ``ACTIVATION_POLICIES`` / ``BATCHNORM_POLICIES`` /
``NORM_POLICIES``. Gradients match to ``rtol`` / ``atol`` (1e-9 / 1e-12; transformers' RMSNorm
computes in float32 whatever its input's dtype, so there float32's precision: 1e-5 / 1e-6).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import actcomp
from actcomp.policies import ACTIVATION_POLICIES, BATCHNORM_POLICIES, NORM_POLICIES, registered_neighbours
from actcomp.policies.norm import TRANSFORMERS_RMS_NORM
from actcomp.policies.pool import _index_dtype


@dataclass(frozen=True)
class Row:
    """One setting of one neighbour type: ``promise`` is the policy's name (``plain``: the
    module runs plain autograd under these settings); ``train``: run in training mode."""

    name: str
    module: Callable[[], nn.Module]
    shape: tuple[int, ...]
    promise: str
    neighbours: actcomp.Neighbours = actcomp.Neighbours()
    train: bool = True
    rtol: float = 1e-9
    atol: float = 1e-12

    @property
    def exact(self) -> bool:
        return not self.promise.startswith("bits") or self.promise == "bits"


def _frozen_eval_batchnorm(cls, channels):
    return lambda: cls(channels).eval().requires_grad_(False)


ROWS: dict[type[nn.Module], list[Row]] = {
    nn.ReLU: [Row("plain", nn.ReLU, (4, 5, 6), "bits"), Row("inplace", lambda: nn.ReLU(inplace=True), (3, 7), "bits")],
    nn.ReLU6: [Row("plain", nn.ReLU6, (4, 5, 6), "bits")],
    nn.LeakyReLU: [Row("slope", lambda: nn.LeakyReLU(0.2), (4, 5, 6), "bits")],
    nn.Hardtanh: [Row("bounds", lambda: nn.Hardtanh(-0.5, 0.7), (4, 5, 6), "bits")],
    nn.Dropout: [Row("p", lambda: nn.Dropout(0.3), (4, 5, 6), "bits")],
    nn.MaxPool1d: [Row("strided-padded", lambda: nn.MaxPool1d(3, 2, 1), (2, 3, 11), "indices")],
    nn.MaxPool2d: [
        Row("window", lambda: nn.MaxPool2d(2), (2, 3, 8, 8), "indices"),
        Row("dilated-ceil-unbatched", lambda: nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True), (3, 9, 9), "indices"),
    ],
    nn.MaxPool3d: [Row("window", lambda: nn.MaxPool3d(2, 1), (2, 2, 4, 5, 4), "indices")],
    nn.AvgPool1d: [Row("strided-padded", lambda: nn.AvgPool1d(3, 2, 1, count_include_pad=False), (2, 3, 11), "nothing")],
    nn.AvgPool2d: [Row("divisor-ceil", lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, divisor_override=5), (2, 3, 8, 8), "nothing")],
    nn.AvgPool3d: [Row("window", lambda: nn.AvgPool3d(2), (2, 2, 4, 4, 4), "nothing")],
    nn.AdaptiveAvgPool1d: [Row("uneven", lambda: nn.AdaptiveAvgPool1d(4), (2, 3, 11), "nothing")],
    nn.AdaptiveAvgPool2d: [Row("uneven", lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 3, 7, 5), "nothing")],
    nn.AdaptiveAvgPool3d: [Row("uneven", lambda: nn.AdaptiveAvgPool3d(2), (2, 2, 5, 4, 3), "nothing")],
}

_BATCHNORM_SHAPES = {nn.BatchNorm1d: (6, 4, 5), nn.BatchNorm2d: (4, 4, 5, 5), nn.BatchNorm3d: (3, 4, 3, 4, 5)}
for _cls, _shape in _BATCHNORM_SHAPES.items():
    ROWS[_cls] = [
        *(
            Row(policy, lambda c=_cls: c(4), _shape, "plain" if policy == "keep" else "factors", actcomp.Neighbours(batchnorm=policy))
            for policy in BATCHNORM_POLICIES
        ),
        Row("eval-trained", lambda c=_cls: c(4).eval(), _shape, "factors", train=False),
        Row("eval-frozen", _frozen_eval_batchnorm(_cls, 4), _shape, "nothing", train=False),
    ]



def _timm_batchnorm_act(channels, **kwargs):
    """timm's BatchNormAct2d without its activation (the BatchNorm policy alone); skipped
    where timm is absent."""
    return lambda: pytest.importorskip("timm.layers").BatchNormAct2d(channels, apply_act=False, **kwargs)


ROWS["timm.layers.norm_act.BatchNormAct2d"] = [
    *(
        Row(policy, _timm_batchnorm_act(4), (4, 4, 5, 5), "plain" if policy == "keep" else "factors", actcomp.Neighbours(batchnorm=policy))
        for policy in BATCHNORM_POLICIES
    ),
    Row("eval-frozen", lambda: _timm_batchnorm_act(4)().eval().requires_grad_(False), (4, 4, 5, 5), "nothing", train=False),
]

_SMOOTH = {
    nn.GELU: [nn.GELU, lambda: nn.GELU(approximate="tanh")],
    nn.SiLU: [nn.SiLU],
    nn.Hardswish: [nn.Hardswish],
    nn.Sigmoid: [nn.Sigmoid],
    nn.Tanh: [nn.Tanh],
}


def _transformers_activation(name):
    """A transformers activation class by name; skipped where transformers is absent."""
    return lambda: getattr(pytest.importorskip("transformers.activations"), name)()


for _name in ("SiLUActivation", "GELUActivation", "NewGELUActivation", "GELUTanh"):
    _SMOOTH[f"transformers.activations.{_name}"] = [_transformers_activation(_name)]
for _cls, _factories in _SMOOTH.items():
    ROWS[_cls] = [
        Row(f"{policy}-{i}", factory, (4, 5, 6), "plain" if policy == "exact" else policy, actcomp.Neighbours(activations=policy))
        for policy in ACTIVATION_POLICIES
        for i, factory in enumerate(_factories)
    ]


def _timm_norm(name, *args, **kwargs):
    """A timm norm class by name; skipped where timm is absent."""
    return lambda: getattr(pytest.importorskip("timm.layers"), name)(*args, **kwargs)


def _transformers_class(qualified, *args):
    """A transformers class by qualified name; skipped where transformers is absent."""
    module, name = qualified.rsplit(".", 1)
    return lambda: getattr(pytest.importorskip(module), name)(*args)


_NORMS = {
    nn.LayerNorm: ([lambda: nn.LayerNorm(6), lambda: nn.LayerNorm((5, 6), bias=False)], (3, 5, 6), {}),
    nn.RMSNorm: ([lambda: nn.RMSNorm(6), lambda: nn.RMSNorm((5, 6), elementwise_affine=False)], (3, 5, 6), {}),
    "timm.layers.norm.LayerNorm": ([_timm_norm("LayerNorm", 6)], (3, 5, 6), {}),
    "timm.layers.norm.LayerNorm2d": ([_timm_norm("LayerNorm2d", 4)], (2, 4, 3, 5), {}),
    **{name: ([_transformers_class(name, 6)], (3, 5, 6), {"rtol": 1e-5, "atol": 1e-6}) for name in TRANSFORMERS_RMS_NORM},
}
_NORM_PROMISE = {"keep": "plain", "exact": "input", "factors": "factors"}
for _cls, (_factories, _shape, _tolerance) in _NORMS.items():
    ROWS[_cls] = [
        Row(f"{policy}-{i}", factory, _shape, _NORM_PROMISE[policy], actcomp.Neighbours(norm=policy), **_tolerance)
        for policy in NORM_POLICIES
        for i, factory in enumerate(_factories)
    ]


def _type_name(t) -> str:
    return t.rsplit(".", 1)[1] if isinstance(t, str) else t.__name__


CASES = [pytest.param(t, row, id=f"{_type_name(t)}-{row.name}") for t, rows in ROWS.items() for row in rows]


def test_every_registered_neighbour_type_has_rows():
    assert set(registered_neighbours()) == set(ROWS), "add settings rows for every registered neighbour type"


def test_every_policy_setting_has_rows():
    for cls in _SMOOTH:
        assert {r.neighbours.activations for r in ROWS[cls]} == set(ACTIVATION_POLICIES)
    for cls in _BATCHNORM_SHAPES:
        assert {r.neighbours.batchnorm for r in ROWS[cls]} == set(BATCHNORM_POLICIES)
    for cls in _NORMS:
        assert {r.neighbours.norm for r in ROWS[cls]} == set(NORM_POLICIES)


def _promised_bytes(row: Row, module: nn.Module, x: torch.Tensor, y: torch.Tensor, state) -> int:
    """What the row's policy promises to keep (the stats' bytes for factors)."""
    if row.promise == "bits":
        return math.ceil(x.numel() / 8)
    if row.promise.startswith("bits"):
        return math.ceil(x.numel() * int(row.promise[len("bits"):]) / 8)
    if row.promise == "indices":
        kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * (x.ndim - 2)
        return y.numel() * torch.empty((), dtype=_index_dtype(math.prod(kernel))).element_size()
    if row.promise == "nothing":
        return 0
    assert row.promise == "factors"
    return state.last.kept_bytes


def _channel_statistics(module: nn.Module, x: torch.Tensor) -> int:
    """BatchNorm also keeps its per-channel mean and 1/sigma; LayerNorm / RMSNorm their per-row
    statistics (in x's dtype; transformers' RMSNorm: 1/rms in float32)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return 2 * x.shape[1] * x.element_size()
    if _qualified(module) in TRANSFORMERS_RMS_NORM:  # 1/rms in float32 per row
        return x.numel() // x.shape[-1] * 4
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):  # per row (timm's LayerNorm2d: over C)
        per_row = 2 if isinstance(module, nn.LayerNorm) else 1
        return x.numel() // math.prod(module.normalized_shape) * per_row * x.element_size()
    return 0


def _qualified(module: nn.Module) -> str:
    """The qualified name of the module's own class (before actcomp's swap)."""
    cls = getattr(type(module), "_actcomp_base", type(module))
    return f"{cls.__module__}.{cls.__qualname__}"


def _run(module: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Output, gradients (input, then trained parameters) and saved bytes of one call."""
    leaf = x.clone().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    with actcomp.count_saved(module) as saved:
        y = module(leaf * 1.0)  # not a leaf: in-place variants may write to it
    grads = torch.autograd.grad(y, [leaf, *params], torch.cos(y.detach()))
    return y.detach(), list(grads), saved.saved_bytes


@pytest.mark.parametrize("neighbour_type, row", CASES)
def test_policy_is_exact_and_keeps_what_it_promises(neighbour_type, row):
    torch.manual_seed(0)
    module = row.module().double()
    assert type(module) is neighbour_type or f"{type(module).__module__}.{type(module).__qualname__}" == neighbour_type
    module.train(row.train)
    with torch.no_grad():
        for name, b in module.named_buffers():
            if name == "running_mean":
                b.uniform_(-0.5, 0.5)
            elif name == "running_var":
                b.uniform_(0.5, 2.0)
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    reference = copy.deepcopy(module)
    # after a compressed layer, so that approximate policies (factors, bits<k>) apply
    model = nn.Sequential(nn.Linear(row.shape[-1], row.shape[-1]), module).double()
    actcomp.compress(model, layers=["0"], method="hosvd", eps=1.0, neighbours=row.neighbours)
    state = actcomp.layer_state(module)
    assert (state is None) == (row.promise == "plain" and (neighbour_type in _SMOOTH or neighbour_type in _NORMS))
    x = torch.randn(row.shape, dtype=torch.float64)

    y, grads, saved_bytes = _run(module, x, seed=1)
    y_ref, grads_ref, plain_bytes = _run(reference, x, seed=1)

    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    if row.exact:
        for g, g_ref in zip(grads, grads_ref, strict=True):
            assert torch.allclose(g, g_ref, rtol=row.rtol, atol=row.atol)
    if row.promise == "plain":
        assert saved_bytes == plain_bytes
        return
    if row.promise in ("factors", "input") and state.last.method == "plain":
        # x itself (never worse than plain: full-rank factors of x outweigh x)
        assert saved_bytes == x.numel() * x.element_size() + _channel_statistics(module, x) <= plain_bytes
        assert state.last.kept_bytes == x.numel() * x.element_size()
        return
    promised = _promised_bytes(row, module, x, y, state)
    assert saved_bytes == promised + _channel_statistics(module, x)
    assert state.last.kept_bytes == promised
    assert state.last.method == row.promise
    assert saved_bytes <= plain_bytes if row.promise == "factors" else saved_bytes < plain_bytes
