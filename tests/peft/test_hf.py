"""Hugging Face Conv1D (GPT-2's layers, weight stored (in, out)); models built from config."""

import io

import pytest
import torch
from torch.func import functional_call

import actcomp
from actcomp.linalg.decompose import hosvd
from actcomp.peft import adapted_layers, householder_sequential, merge, svd_adapt
from conftest import rel_err

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def test_conv1d_layer_starts_at_the_pretrained_weight():
    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv1D(6, 9)).double()
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    reference = model(x)
    weight = model[0].weight.detach().clone()
    svd_adapt(model, "all", reflections=4)
    layer = model[0]
    assert isinstance(layer, Conv1D) and type(layer).__name__ == "SVDConv1D"
    assert layer.weight.shape == (9, 6) and layer.weight_matrix().shape == (6, 9)
    assert rel_err(layer.weight, weight) < 1e-13
    assert rel_err(model(x), reference) < 1e-13
    assert "SVDConv1D(nf=6, nx=9, svd(k=6, reflections=4, side=out, train=s+q))" == repr(layer)


@pytest.mark.parametrize("side", ["out", "in"])
def test_conv1d_gradients_equal_autograd_on_the_definition(side):
    torch.manual_seed(0)
    model = svd_adapt(torch.nn.Sequential(Conv1D(6, 9)).double(), "all", reflections=4, side=side)
    layer = model[0]
    with torch.no_grad():
        layer.reflectors.add_(0.5 * torch.randn_like(layer.reflectors))
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    s = layer.s.detach().clone().requires_grad_()
    q = layer.reflectors.detach().clone().requires_grad_()
    u, v = (householder_sequential(q, layer.u0), layer.v0) if side == "out" else (layer.u0, householder_sequential(q, layer.v0))
    plain = Conv1D(6, 9).double()
    y_ref = functional_call(plain, {"weight": ((u * s) @ v.T).T, "bias": layer.bias.detach()}, (x,))
    y_ref.backward(dy)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(layer.s.grad, s.grad) < 1e-10 and rel_err(layer.reflectors.grad, q.grad) < 1e-10


def test_conv1d_compressed_gradients_equal_autograd_on_reconstruction():
    torch.manual_seed(0)
    layer = svd_adapt(torch.nn.Sequential(Conv1D(6, 9)).double(), "all", reflections=4)[0]
    with torch.no_grad():
        layer.reflectors.add_(0.5 * torch.randn_like(layer.reflectors))
    x = torch.randn(4, 5, 9, dtype=torch.float64).cumsum(0).cumsum(1)
    dy = torch.randn(4, 5, 6, dtype=torch.float64)
    x_hat = hosvd(x, 0.9).reconstruct()
    assert rel_err(x_hat, x) > 1e-6
    layer(x_hat).backward(dy)
    expected = (layer.s.grad.clone(), layer.reflectors.grad.clone())
    layer.zero_grad()
    actcomp.compress(layer, method="hosvd", eps=0.9)
    layer(x).backward(dy)
    assert rel_err(layer.s.grad, expected[0]) < 1e-10 and rel_err(layer.reflectors.grad, expected[1]) < 1e-10
    assert actcomp.stats(layer)[""].kept_bytes < x.nbytes


def test_gpt2_from_config_adapts_trains_and_merges():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    reference = model(ids).logits
    with pytest.raises(ValueError, match=r"'lm_head' \(Linear\): its weight is shared .*tied"):
        svd_adapt(model, "all")
    svd_adapt(model, "re:\\.(attn|mlp)\\.", reflections=4)
    assert len(adapted_layers(model)) == 8  # c_attn, c_proj, c_fc, c_proj per block
    assert rel_err(model(ids).logits, reference) < 1e-5

    model.train()
    model.requires_grad_(False)
    for m in adapted_layers(model):
        model.get_submodule(m).s.requires_grad_(True)
        model.get_submodule(m).reflectors.requires_grad_(True)
    actcomp.compress(model, list(adapted_layers(model)), method="svd", eps=0.9)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    stats = actcomp.stats(model)
    assert len(stats) == 8 and all(s.layer_type == "SVDConv1D" for s in stats.values())

    model.eval()
    adapted_logits = model(ids).logits
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    actcomp.restore(model)
    merge(model)
    assert all(type(model.get_submodule(n)) is Conv1D for n in stats)
    assert rel_err(model(ids).logits, adapted_logits) < 1e-6
    assert rel_err(model(ids).logits, reference) > 1e-4  # training changed something

    buffer.seek(0)
    fresh = svd_adapt(transformers.GPT2LMHeadModel(config).eval(), "re:\\.(attn|mlp)\\.", reflections=4)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh(ids).logits, adapted_logits)


def test_conv1d_adapted_model_pickles():
    from actcomp.peft import layers

    torch.manual_seed(0)
    model = svd_adapt(torch.nn.Sequential(Conv1D(6, 9), torch.nn.ReLU(), Conv1D(4, 6)), "all", reflections=2)
    assert layers.SVDConv1D is type(model[0])  # importable by name, as pickle finds classes
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(3, 9)
    assert type(loaded[2]) is type(model[2]) and torch.equal(loaded(x), model(x))
