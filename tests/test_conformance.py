"""Every registered layer type x every registered method, driven by the registries.

Each layer type has settings rows (BackPACK-style: a module factory and an input factory) and
each method a row saying what it promises. For every pair, in float64 against plain autograd:

* methods exact at eps = 1: outputs equal and all gradients equal (1e-10);
* methods whose dW is autograd's on the reconstruction: at eps < 1, dW equals plain autograd
  applied to ``factors.reconstruct()`` (the same factors the kernel computed), dX and db exact;
* every method: the bytes autograd keeps for the layer are the factors' bytes (the stats'
  ``kept_bytes``), and nothing when the weight is frozen;
* calling the layer with a keyword argument runs the kernel; other signatures raise by name.

Adding a layer type means one ``register_layer`` call and one entry in ``LAYER_ROWS``; adding
a method one file in actcomp/methods and one entry in ``METHOD_ROWS``. The first two tests fail
until the rows exist. A layer whose weight is computed (actcomp.peft's SVD-parametrised layers:
W from s and reflection vectors) is checked on the parameters W is computed from, and its
weight side (W, and what computing W keeps) is counted apart from the factors.
"""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.kernels import qualified_name, registered_types, registration_for
from actcomp.methods import method_class
from actcomp.peft import svd_adapt, svd_conv1d_class
from conftest import rel_err


def smooth(shape):
    """Post-ReLU, spatially smooth activations (correlated modes), so eps < 1 truncates."""
    x = torch.randn(*shape, dtype=torch.float64)
    for mode in range(1, len(shape)):
        x = x.cumsum(mode) / shape[mode] ** 0.5
    return F.relu(x + 0.3)


def hf_conv1d(nf, nx):
    """transformers' Conv1D (weight stored (in, out)); skipped where transformers is absent."""
    return pytest.importorskip("transformers.pytorch_utils").Conv1D(nf, nx)


def timm_linear(in_features, out_features):
    """timm's Linear (nn.Linear overriding forward); skipped where timm is absent."""
    return pytest.importorskip("timm.layers.linear").Linear(in_features, out_features)


# type (or the qualified name it is registered by) -> [(id, module factory, input shape)]
LAYER_ROWS = {
    nn.Linear: [
        ("2d", lambda: nn.Linear(7, 5), (9, 7)),
        ("tokens", lambda: nn.Linear(7, 5), (3, 4, 7)),
        ("no-bias-4d", lambda: nn.Linear(7, 5, bias=False), (2, 3, 4, 7)),
    ],
    "transformers.pytorch_utils.Conv1D": [
        ("2d", lambda: hf_conv1d(5, 7), (9, 7)),
        ("tokens", lambda: hf_conv1d(5, 7), (3, 4, 7)),
    ],
    "timm.layers.linear.Linear": [
        ("tokens", lambda: timm_linear(7, 5), (3, 4, 7)),
    ],
    nn.Conv1d: [
        ("dense", lambda: nn.Conv1d(4, 6, 3, padding=1), (5, 4, 9)),
        ("grouped-strided-circular", lambda: nn.Conv1d(4, 6, 3, 2, 1, groups=2, padding_mode="circular"), (5, 4, 9)),
    ],
    nn.Conv2d: [
        ("dense", lambda: nn.Conv2d(4, 6, 3, padding=1), (5, 4, 8, 8)),
        ("depthwise-strided", lambda: nn.Conv2d(6, 6, 3, 2, 1, groups=6), (5, 6, 8, 8)),
        ("same-reflect-no-bias", lambda: nn.Conv2d(4, 6, 4, padding="same", padding_mode="reflect", bias=False), (5, 4, 8, 8)),
    ],
    nn.Conv3d: [
        ("dense", lambda: nn.Conv3d(3, 4, 3, padding=1), (4, 3, 6, 6, 5)),
        ("grouped-strided-dilated", lambda: nn.Conv3d(4, 6, (3, 3, 1), (2, 1, 1), (1, 2, 0), (1, 2, 1), groups=2), (4, 4, 6, 7, 5)),
        ("depthwise-replicate", lambda: nn.Conv3d(4, 4, 3, padding=1, groups=4, padding_mode="replicate"), (3, 4, 5, 5, 5)),
    ],
}


# Custom kernels (register_kernel) of modules that run their projections as layers: the checks
# above read a single weight and a family, which they have not; tests/kernels/test_attention.py
# checks them (exact at eps 1 for every method, bytes kept, stats, selection).
LAYER_ROWS[nn.MultiheadAttention] = []
LAYER_ROWS["torchvision.models.swin_transformer.ShiftedWindowAttention"] = []
LAYER_ROWS["torchvision.models.swin_transformer.ShiftedWindowAttentionV2"] = []

def svd(factory, **settings):
    """The layer SVD-parametrised (actcomp.peft), its reflection vectors moved off Q = I."""

    def make():
        layer = svd_adapt(nn.Sequential(factory()), "all", **settings)[0]
        if layer.reflectors is not None:
            with torch.no_grad():
                layer.reflectors.add_(0.3 * torch.randn_like(layer.reflectors))
        return layer

    return make


LAYER_ROWS[type(svd(lambda: nn.Linear(2, 2), train="s")())] = [
    ("s+q-tokens", svd(lambda: nn.Linear(7, 5), reflections=4), (3, 4, 7)),
    ("s-no-bias", svd(lambda: nn.Linear(7, 5, bias=False), train="s"), (9, 7)),
]
LAYER_ROWS[type(svd(lambda: nn.Conv2d(1, 1, 1), train="s")())] = [
    ("s+q-in-depthwise-strided", svd(lambda: nn.Conv2d(6, 6, 3, 2, 1, groups=6), reflections=4, side="in"), (5, 6, 8, 8)),
    ("s+q-reflect", svd(lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), reflections=4), (5, 4, 8, 8)),
]
try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional: without it no SVDConv1D is registered
    Conv1D = None
if Conv1D is not None:
    LAYER_ROWS[svd_conv1d_class()] = [("s+q-tokens", svd(lambda: Conv1D(5, 7), reflections=4), (3, 4, 7))]

# method -> the eps used below 1 (None: the method has no eps) and the config at that setting
METHOD_ROWS = {
    "hosvd": dict(eps=0.8),
    "asi": dict(eps=0.8),
    "oneshot": dict(eps=0.8),
    "svd": dict(eps=0.8),
    "hosvd_unbiased": dict(eps=0.8),
    "svd_unbiased": dict(eps=0.8),
    "syncfree": dict(eps=0.8),
    "gradient_filter": dict(eps=None, config=actcomp.CompressionConfig("gradient_filter", patch=2)),
    "none": dict(eps=None, config=actcomp.CompressionConfig("none")),
}

CASES = [(t, row) for t, rows in LAYER_ROWS.items() for row in rows]
CASE_IDS = [f"{t.rsplit('.', 1)[1] if isinstance(t, str) else t.__name__}-{row[0]}" for t, row in CASES]


def config_of(method, eps=None):
    row = METHOD_ROWS[method]
    if row["eps"] is None:
        return row["config"]
    return actcomp.CompressionConfig(method, row["eps"] if eps is None else eps)


def test_every_registered_layer_type_has_rows():
    assert set(registered_types()) == set(LAYER_ROWS), "add settings rows for every registered layer type"


def test_every_registered_method_has_a_row():
    assert set(actcomp.method_names()) == set(METHOD_ROWS), "add a row for every registered method"


def make(case):
    module_type, (_, factory, shape) = case
    torch.manual_seed(0)
    layer = factory().double()
    assert type(layer) is module_type or qualified_name(type(layer)) == module_type
    return layer, smooth(shape).requires_grad_()


def weight_params(layer):
    """What the weight is: the weight parameter, or the parameters a computed weight is computed
    from (an SVD-parametrised layer's s and reflection vectors): every parameter but the bias."""
    return [p for name, p in layer.named_parameters() if name != "bias"]


def grads(layer, x, dy=None):
    """(y, [dX, d(each weight parameter)..., db if there is a bias], dY)."""
    layer.zero_grad()
    x.grad = None
    y = layer(x)
    if dy is None:
        dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    out = [x.grad.clone(), *(p.grad.clone() for p in weight_params(layer))]
    if layer.bias is not None:
        out.append(layer.bias.grad.clone())
    return y.detach(), out, dy


def weight_side_bytes(layer):
    """(what computing the weight keeps, the weight's bytes) for a computed weight; (0, 0) for a
    weight parameter or a view of one (HF Conv1D's W^T), whose storage count_saved leaves out."""
    weight, _ = registration_for(type(layer)).params(layer)
    storage = weight.untyped_storage().data_ptr()
    if any(storage == p.untyped_storage().data_ptr() for p in layer.parameters()):
        return 0, 0
    with actcomp.count_saved(layer) as saved:
        weight, _ = registration_for(type(layer)).params(layer)
    return saved.saved_bytes, weight.numel() * weight.element_size()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", [m for m in METHOD_ROWS if method_class(m).exact_at_one])
def test_eps_one_equals_plain_autograd(case, method):
    layer, x = make(case)
    y_ref, ref, dy = grads(layer, x)
    actcomp.compress(layer, config=config_of(method, 1.0))
    for _ in range(2):  # the second step runs on carried state (asi)
        y, ours, _ = grads(layer, x, dy)
        assert torch.equal(y, y_ref)
        for a, b in zip(ours, ref):
            assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", [m for m in METHOD_ROWS if method_class(m).reconstructs and method_class(m).knob == "eps"])
def test_eps_below_one_equals_autograd_on_reconstruction(case, method):
    layer, x = make(case)
    config = config_of(method)
    actcomp.compress(layer, config=config)
    for step in range(2):  # asi: the second step uses the subspaces carried from the first
        state = actcomp.layer_state(layer)
        registration = registration_for(type(layer))
        geometry = registration.family.geometry(layer)
        layout = registration.family.layout(geometry, x)
        factors = state.compressor.compress(x.detach(), layout, copy.deepcopy(state.method_state))
        x_hat = factors.reconstruct().reshape(x.shape)
        assert rel_err(x_hat, x) > 1e-6  # something was truncated
        _, ours, dy = grads(layer, x)
        assert actcomp.stats(layer)[""].ranks == state.compressor.ranks(factors)
        with actcomp.suspended(layer):
            _, on_reconstruction, _ = grads(layer, x_hat.clone().requires_grad_(), dy)
            _, exact, _ = grads(layer, x, dy)
        for k in range(1, 1 + len(weight_params(layer))):
            assert rel_err(ours[k], on_reconstruction[k]) < 1e-10  # dW from the factors
        assert rel_err(ours[0], exact[0]) < 1e-10  # dX exact from the weight
        if layer.bias is not None:
            assert rel_err(ours[-1], exact[-1]) < 1e-10  # db exact
        x = (x.detach() * 1.01).requires_grad_()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", list(METHOD_ROWS))
@pytest.mark.parametrize("frozen", [False, True])
def test_saved_bytes_are_the_factors_bytes(case, method, frozen):
    layer, x = make(case)
    x = x.detach()  # an input that needs no gradient: the layer's own saved tensors only
    for p in weight_params(layer):
        p.requires_grad_(not frozen)
    actcomp.compress(layer, config=config_of(method))
    with actcomp.count_saved(layer) as saved:
        y = layer(x)
    kept = actcomp.stats(layer)[""].kept_bytes
    if method == "none":
        # plain autograd keeps what it keeps (a padded copy for reflect/replicate/circular
        # padding, the input for a trained bias); the stats report the input when W trains
        assert kept == (0 if frozen else x.numel() * x.element_size())
        return
    computing_weight, weight = weight_side_bytes(layer)  # both 0 for a weight parameter
    if weight and method == "gradient_filter" and module_has_no_space(layer):
        # a computed weight run by plain autograd (the layer's own forward): it keeps what it keeps
        assert kept == (0 if frozen else x.numel() * x.element_size())
        return
    assert saved.saved_bytes == kept + computing_weight + (weight if y.requires_grad else 0)  # no graph: nothing kept
    if frozen:
        assert kept == 0
    elif method == "none" or (method == "gradient_filter" and module_has_no_space(layer)):
        assert kept == x.numel() * x.element_size()
    else:
        assert 0 < kept < x.numel() * x.element_size()
    del y


def module_has_no_space(layer):
    return registration_for(type(layer)).family.name == "linear"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_keyword_call_runs_the_kernel(case):
    layer, x = make(case)
    reference = copy.deepcopy(layer)
    name = list(inspect.signature(type(layer).forward).parameters)[1]  # "input"; HF Conv1D: "x"
    computing_weight, weight = weight_side_bytes(layer)
    actcomp.compress(layer, eps=0.9)
    state = actcomp.layer_state(layer)
    with actcomp.count_saved(layer) as saved:
        y = layer(**{name: x})
    assert state.runs == 1 and saved.saved_bytes - computing_weight - weight == state.last.kept_bytes < x.numel() * 8
    assert torch.equal(y, reference(x))


def test_unsupported_call_signature_raises_naming_the_layer():
    model = nn.Sequential(nn.Linear(4, 3))
    actcomp.compress(model)
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match=re.escape("layer '0' (Linear)")):
        model[0](x, x)
    with pytest.raises(TypeError, match=re.escape("layer '0' (Linear): missing a required argument: 'input'")):
        model[0](weights=x)
    with pytest.raises(TypeError, match="takes one input tensor 'input'"):
        model[0]([1.0, 2.0])


def test_extra_forward_arguments_are_refused_by_name():
    """A layer whose forward takes more than its input (a registered type with an optional
    argument): the compressed kernel binds the call as that forward does and refuses the extra."""
    from actcomp.attach.swap import _input_of

    class WithExtra(nn.Linear):
        def forward(self, input, scale=None):  # noqa: A002
            return super().forward(input)

    layer = actcomp.compress(nn.Sequential(nn.Linear(4, 3)))[0]
    x = torch.randn(2, 4)
    state = actcomp.layer_state(layer)
    assert _input_of(layer, WithExtra, state, (), {"input": x}) is x
    with pytest.raises(TypeError, match=re.escape("layer '0' (Linear) was called as (Tensor, scale=)")):
        _input_of(layer, WithExtra, state, (x,), {"scale": 2.0})
