"""The attention kernels (actcomp/kernels/mha.py, swin.py): nn.MultiheadAttention and
torchvision's ShiftedWindowAttention (V1, V2) with their projections run as layers, against the
modules' own forward in float64.

Each kernel is called as the compressed module's forward calls it, on a layer state of its own,
with the projections it calls (out_proj; qkv and proj) compressed as layers: at eps 1 the
outputs, the attention weights and every gradient equal torch's to 1e-10 over a grid of
settings (batch_first, bias, need_weights, masks, causal, dropout under one seed, unbatched
inputs; Swin's padding, shift and V2's cosine attention); at eps < 1 the bytes autograd keeps
are plain's less each projection's input plus its factors.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.core.config import CompressionConfig
from actcomp.core.state import KernelNotRunWarning, LayerState
from actcomp.kernels.mha import multihead_attention_kernel
from actcomp.kernels.swin import PARENT, shifted_window_attention_kernel, shifted_window_attention_v2_kernel
from conftest import rel_err

E, HEADS, L, N = 8, 2, 5, 3


def smooth(*shape):
    """Correlated activations (cumulative sums over every mode but the last), so eps < 1 truncates."""
    x = torch.randn(*shape, dtype=torch.float64)
    for mode in range(len(shape) - 1):
        x = x.cumsum(mode) / shape[mode] ** 0.5
    return x


def state_for(module: nn.Module, eps: float, name: str = "attn") -> LayerState:
    return LayerState(name=name, layer_type=type(module).__name__, config=CompressionConfig("hosvd", eps))


def gradients(module: nn.Module, x: torch.Tensor, outputs: tuple) -> list[torch.Tensor]:
    """dX and every parameter's gradient of sum(out * R) (+ the weights' likewise) for fixed R."""
    generator = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum() for t in outputs if t is not None)
    params = [p for p in module.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, [x, *params], allow_unused=True))


def assert_close(ours: list, expected: list) -> None:
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            assert rel_err(a, b) < 1e-10


# ---------------------------------------------------------------- nn.MultiheadAttention

def mha(batch_first=False, bias=True, dropout=0.0):
    torch.manual_seed(0)
    return nn.MultiheadAttention(E, HEADS, dropout=dropout, bias=bias, batch_first=batch_first).double()


def causal():
    return torch.triu(torch.full((L, L), float("-inf"), dtype=torch.float64), 1)


# (id, module settings, call keyword arguments)
MHA_CASES = [
    ("defaults", {}, {}),
    ("batch-first-no-bias", dict(batch_first=True, bias=False), {}),
    ("sdpa", dict(batch_first=True), dict(need_weights=False)),
    ("per-head-weights", {}, dict(average_attn_weights=False)),
    ("key-padding", dict(batch_first=True), dict(key_padding_mask=torch.tensor([[False] * L, [False] * 3 + [True] * 2, [True] + [False] * 4]))),
    ("key-padding-sdpa", {}, dict(need_weights=False, key_padding_mask=torch.tensor([[False] * L, [False] * 3 + [True] * 2, [True] + [False] * 4]))),
    ("float-mask", {}, dict(attn_mask=torch.randn(L, L, dtype=torch.float64))),
    ("bool-3d-mask-sdpa", {}, dict(need_weights=False, attn_mask=torch.rand(N * HEADS, L, L) < 0.3)),
    ("causal-sdpa", dict(batch_first=True), dict(need_weights=False, attn_mask=causal(), is_causal=True)),
    ("causal-weights", {}, dict(attn_mask=causal(), is_causal=True)),
    ("dropout", dict(dropout=0.3), {}),
    ("dropout-sdpa", dict(dropout=0.3, batch_first=True), dict(need_weights=False)),
]


def mha_input(module, unbatched=False):
    shape = (L, E) if unbatched else ((N, L, E) if module.batch_first else (L, N, E))
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("settings, call", [c[1:] for c in MHA_CASES], ids=[c[0] for c in MHA_CASES])
@pytest.mark.parametrize("method", ["hosvd", "svd", "asi", "none"])
def test_multihead_attention_at_eps_one_equals_torch(settings, call, method):
    reference = mha(**settings)
    module = copy.deepcopy(reference)
    actcomp.compress(module, ["out_proj"], method=method, eps=1.0)
    state = LayerState(name="attn", layer_type="MultiheadAttention", config=CompressionConfig(method, 1.0))
    x = mha_input(module)
    torch.manual_seed(3)
    expected_out = reference(x, x, x, **call)
    expected = gradients(reference, x, expected_out)
    torch.manual_seed(3)
    out = multihead_attention_kernel(module, state, x, x, x, **call)
    ours = gradients(module, x, out)
    assert (out[1] is None) == (expected_out[1] is None)
    assert_close([t for t in out if t is not None], [t for t in expected_out if t is not None])
    assert_close(ours, expected)
    # both projections ran their kernels: the in-projection on the module's state, out_proj its own
    assert state.runs == 1 and actcomp.layer_state(module.out_proj).runs == 1


def test_multihead_attention_unbatched_input():
    reference = mha()
    module = copy.deepcopy(reference)
    actcomp.compress(module, ["out_proj"], eps=1.0)
    x = mha_input(module, unbatched=True)
    expected_out = reference(x, x, x)
    out = multihead_attention_kernel(module, state_for(module, 1.0), x, x, x)
    assert out[0].shape == (L, E) and out[1].shape == (L, L)
    assert_close(list(out), list(expected_out))
    assert_close(gradients(module, x, out), gradients(reference, x, expected_out))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_keeps_factors_of_its_projections_inputs(batch_first, need_weights):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 2, batch_first=batch_first).double()
    module = copy.deepcopy(reference)
    actcomp.compress(module, ["out_proj"], eps=0.8)
    state = state_for(module, 0.8)
    x = smooth(4, 12, 16) if batch_first else smooth(12, 4, 16)
    with actcomp.count_saved(reference) as plain:
        reference(x, x, x, need_weights=need_weights)
    with actcomp.count_saved(module) as saved:
        multihead_attention_kernel(module, state, x, x, x, need_weights=need_weights)
    in_projection, out_projection = state.last, actcomp.stats(module)["out_proj"]
    assert all(p.method == "hosvd" and 0 < p.kept_bytes < p.input_bytes for p in (in_projection, out_projection))
    # the query is no longer kept; out_proj's input is freed on the explicit-softmax path, while
    # on the SDPA path it is a view of SDPA's output, which SDPA keeps for its own backward anyway
    freed = in_projection.input_bytes + (out_projection.input_bytes if need_weights else 0)
    assert plain.saved_bytes - saved.saved_bytes == freed - in_projection.kept_bytes - out_projection.kept_bytes


@pytest.mark.parametrize(
    "settings, call, reason",
    [
        ({}, "cross", "it was called with query, key and value not one tensor"),
        (dict(add_bias_kv=True), "self", "add_bias_kv=True"),
        (dict(add_zero_attn=True), "self", "add_zero_attn=True"),
        (dict(kdim=6, vdim=6), "kdim", "kdim/vdim differ from embed_dim"),
    ],
    ids=["cross-attention", "bias-kv", "zero-attn", "kdim"],
)
def test_multihead_attention_outside_the_kernel_runs_torch_with_a_warning(settings, call, reason):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(E, HEADS, **settings).double()
    module = copy.deepcopy(reference)
    actcomp.compress(module, ["out_proj"], eps=1.0)
    state = state_for(module, 1.0)
    x = mha_input(module)
    memory = torch.randn(L + 1, N, 6 if call == "kdim" else E, dtype=torch.float64)
    args = (x, memory, memory) if call in ("cross", "kdim") else (x, x, x)
    torch.manual_seed(3)
    expected = reference(*args)
    with pytest.warns(KernelNotRunWarning, match=re.escape(f"layer 'attn' (MultiheadAttention) runs torch's own forward, not the compressed kernel: {reason}")):
        torch.manual_seed(3)
        out = multihead_attention_kernel(module, state, *args)
    assert_close(list(out), list(expected))
    assert state.last.method == "plain" and state.last.ranks == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        multihead_attention_kernel(module, state, *args)


# ---------------------------------------------------------------- torchvision's Swin attention

st = pytest.importorskip("torchvision.models.swin_transformer")

SWIN_KERNELS = {"v1": shifted_window_attention_kernel, "v2": shifted_window_attention_v2_kernel}


def swin_attention(version, dim=8, shift=2, bias=True, dropout=0.0):
    torch.manual_seed(0)
    cls = st.ShiftedWindowAttentionV2 if version == "v2" else st.ShiftedWindowAttention
    module = cls(dim, [4, 4], [shift, shift], HEADS, qkv_bias=bias, proj_bias=bias, attention_dropout=dropout, dropout=dropout)
    if version == "v1":
        with torch.no_grad():  # a bias table away from its near-zero init
            module.relative_position_bias_table.normal_()
    return module.double()


SWIN_CASES = [
    ("shifted", dict(), (2, 8, 8, 8)),
    ("padded-shifted", dict(), (2, 6, 7, 8)),
    ("unshifted-no-bias", dict(shift=0, bias=False), (2, 8, 8, 8)),
    ("one-window", dict(), (2, 4, 4, 8)),  # window covers the map: no shift
    ("dropout", dict(dropout=0.3), (2, 8, 8, 8)),
]


@pytest.mark.parametrize("version", list(SWIN_KERNELS))
@pytest.mark.parametrize("settings, shape", [c[1:] for c in SWIN_CASES], ids=[c[0] for c in SWIN_CASES])
def test_shifted_window_attention_at_eps_one_equals_torchvision(version, settings, shape):
    reference = swin_attention(version, **settings)
    module = copy.deepcopy(reference)
    actcomp.compress(module, ["qkv", "proj"], eps=1.0)
    state = state_for(module, 1.0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    expected_out = reference(x)
    expected = gradients(reference, x, (expected_out,))
    torch.manual_seed(3)
    out = SWIN_KERNELS[version](module, state, x)
    assert_close([out], [expected_out])
    assert_close(gradients(module, x, (out,)), expected)
    assert [actcomp.layer_state(m).runs for m in (module.qkv, module.proj)] == [1, 1]
    # the module's own entry: its parameters need nothing of x; the projections are listed apart
    assert state.last.method == PARENT and state.last.kept_bytes == 0


def test_swin_v2_key_bias_gets_exactly_zero_gradient():
    reference = swin_attention("v2")
    module = copy.deepcopy(reference)
    actcomp.compress(module, ["qkv", "proj"], eps=1.0)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    shifted_window_attention_v2_kernel(module, state_for(module, 1.0), x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    grad = module.qkv.bias.grad
    assert torch.count_nonzero(grad[8:16]) == 0 and torch.count_nonzero(grad[:8]) > 0
    assert rel_err(grad, reference.qkv.bias.grad) < 1e-10


@pytest.mark.parametrize("version", list(SWIN_KERNELS))
def test_shifted_window_attention_keeps_factors_of_its_projections_inputs(version):
    reference = swin_attention(version, dim=16)
    module = copy.deepcopy(reference)
    actcomp.compress(module, ["qkv", "proj"], eps=0.8, neighbours=None)  # cpb_mlp's ReLU: plain
    x = smooth(4, 8, 8, 16)
    with actcomp.count_saved(reference) as plain:
        reference(x)
    with actcomp.count_saved(module) as saved:
        SWIN_KERNELS[version](module, state_for(module, 0.8), x)
    projections = [actcomp.stats(module)[n] for n in ("qkv", "proj")]
    assert all(p.method == "hosvd" and 0 < p.kept_bytes < p.input_bytes for p in projections)
    assert plain.saved_bytes - saved.saved_bytes == sum(p.input_bytes - p.kept_bytes for p in projections)


# ---------------------------------------------------------------- whole models: compress(sample=)

def vit():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, dropout=0.1, attention_dropout=0.1)
    return model.double(), torch.randn(3, 3, 32, 32, dtype=torch.float64)


def swin(v2=False):
    torch.manual_seed(0)
    extra = dict(block=st.SwinTransformerBlockV2, downsample_layer=st.PatchMergingV2) if v2 else {}
    model = st.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=5, dropout=0.1, attention_dropout=0.1, **extra)
    return model.double(), torch.randn(3, 3, 24, 24, dtype=torch.float64)  # 6x6 tokens: padded windows


MODELS = {"vit": vit, "swin": swin, "swin_v2": lambda: swin(v2=True)}
PARENTS = {"vit": nn.MultiheadAttention, "swin": st.ShiftedWindowAttention, "swin_v2": st.ShiftedWindowAttentionV2}
PROJECTIONS = {"vit": ("out_proj",), "swin": ("qkv", "proj"), "swin_v2": ("qkv", "proj")}


@pytest.mark.parametrize("name", list(MODELS))
def test_whole_model_at_eps_one_equals_plain_with_every_projection_compressed(name):
    model, x = MODELS[name]()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelNotRunWarning)  # nothing left out, nothing not run
        actcomp.compress(model, eps=1.0, sample=x[:1])
        parents = [n for n, m in model.named_modules() if type(m).__mro__[1] is PARENTS[name]]
        projections = [f"{p}.{c}" for p in parents for c in PROJECTIONS[name]]
        assert parents and set(parents + projections) <= set(actcomp.compressed_layers(model))
        x.requires_grad_()
        torch.manual_seed(3)  # dropout and stochastic depth draw the same masks
        out = model(x)
        ours = gradients(model, x, (out,))
    torch.manual_seed(3)
    expected_out = reference(x)
    assert_close([out], [expected_out])
    assert_close(ours, gradients(reference, x, (expected_out,)))
    stats = actcomp.stats(model)
    assert all(actcomp.layer_state(dict(model.named_modules())[n]).runs == 1 and n in stats for n in parents + projections)
    assert all(stats[n].method == "plain" for n in projections)  # eps 1 keeps each input itself


def test_vit_keeps_factors_of_every_projection_at_eps_below_one():
    model, x = vit()
    reference = copy.deepcopy(model)
    actcomp.compress(model, eps=0.9, sample=x[:1], neighbours=None)
    with actcomp.count_saved(reference) as plain:
        reference(x)
    with actcomp.count_saved(model) as saved:
        model(x)
    stats = actcomp.stats(model)
    attention = [n for n, s in stats.items() if s.layer_type in ("MultiheadAttention", "NonDynamicallyQuantizableLinear")]
    assert len(attention) == 4 and all(stats[n].method == "hosvd" and stats[n].kept_bytes < stats[n].input_bytes for n in attention)
    assert saved.saved_bytes < plain.saved_bytes


def test_a_projection_selected_without_its_parent_is_left_out_or_refused():
    model, x = vit()
    out_proj = "encoder.layers.encoder_layer_0.self_attention.out_proj"
    with pytest.warns(KernelNotRunWarning, match=re.escape(f"layer '{out_proj}' (NonDynamicallyQuantizableLinear) is called only by the compressed kernel of its parent")):
        actcomp.compress(model, "re:out_proj", sample=x[:1])
    assert actcomp.compressed_layers(model) == {}
    with pytest.raises(ValueError, match="select the parent too"):
        actcomp.compress(model, [out_proj], sample=x[:1])
    actcomp.compress(model, [out_proj.rsplit(".", 1)[0], out_proj], eps=0.9, sample=x[:1])
    model(x).sum().backward()
    assert actcomp.stats(model)[out_proj].method == "hosvd"


@pytest.mark.parametrize("name", list(MODELS))
def test_a_method_that_runs_linear_layers_plainly_still_runs_every_projection(name):
    model, x = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelNotRunWarning)
        actcomp.compress(model, method="none", sample=x[:1])
        model(x).sum().backward()
    layers = actcomp.compressed_layers(model)
    assert all(actcomp.layer_state(m).runs == 1 for n, m in model.named_modules() if n in layers)
