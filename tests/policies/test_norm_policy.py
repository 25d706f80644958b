"""LayerNorm / RMSNorm neighbour policy: exact at eps = 1 on both paths (factors of x_hat, and x
itself where the factors outweigh it) and under ``norm="exact"`` at any eps, its gradient error at eps < 1 bounded and shrinking with
eps, what it keeps reported by measure, opt-in only, and transformers' RMSNorm classes checked
to run LLaMA's forward before they are registered."""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import re

import pytest
import torch
from torch import nn

import actcomp
from actcomp.policies import norm as norm_policy

MODULES = {
    "layernorm": (lambda: nn.LayerNorm(6), [(4, 6), (3, 5, 6), (2, 3, 4, 6)]),
    "layernorm-no-bias": (lambda: nn.LayerNorm(6, bias=False), [(3, 5, 6)]),
    "layernorm-no-affine": (lambda: nn.LayerNorm(6, elementwise_affine=False), [(3, 5, 6)]),
    "layernorm-2-modes": (lambda: nn.LayerNorm((5, 6)), [(3, 5, 6), (2, 3, 5, 6)]),
    "rmsnorm": (lambda: nn.RMSNorm(6), [(4, 6), (3, 5, 6), (2, 3, 4, 6)]),
    "rmsnorm-eps-none-no-affine": (lambda: nn.RMSNorm(6, elementwise_affine=False), [(3, 5, 6)]),
    "rmsnorm-2-modes": (lambda: nn.RMSNorm((5, 6), eps=1e-3), [(3, 5, 6), (2, 3, 5, 6)]),
}
CASES = [pytest.param(name, shape, id=f"{name}-{len(shape)}d") for name, (_, shapes) in MODULES.items() for shape in shapes]


def _compressed(module: nn.Module, width: int, eps: float, dtype=torch.float64, policy: str = "factors") -> nn.Module:
    """``module`` after a compressed Linear (so approximate policies apply), norm factors on."""
    model = nn.Sequential(nn.Linear(width, width), module).to(dtype)
    actcomp.compress(model, layers=["0"], method="hosvd", eps=eps, neighbours=actcomp.Neighbours(norm=policy))
    return module


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Output, gradients (input, then trained parameters) and the bytes autograd kept."""
    leaf = x.clone().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    with actcomp.count_saved(module) as saved:
        y = module(leaf * 1.0)
    return y.detach(), list(torch.autograd.grad(y, [leaf, *params], dy)), saved.saved_bytes


def _affine(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    return module


@pytest.mark.parametrize("path", ["factors", "plain", "exact"])
@pytest.mark.parametrize("name, shape", CASES)
def test_eps_one_equals_plain_autograd(name, shape, path, monkeypatch):
    """dX, dweight, dbias equal plain autograd's in float64 to 1e-10, on the factors path
    (forced: full-rank factors outweigh a small x), on its fallback that keeps x, and under
    ``norm="exact"`` (x kept at any eps: 0.5 here) with no more bytes than plain."""
    if path == "factors":
        monkeypatch.setattr(norm_policy, "_outweighs", lambda factors, x: False)
    module = _affine(MODULES[name][0]().double())
    reference = copy.deepcopy(module)
    _compressed(module, shape[-1], **({"eps": 0.5, "policy": "exact"} if path == "exact" else {"eps": 1.0}))
    torch.manual_seed(1)
    x, dy = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    y, grads, kept = _step(module, x, dy)
    y_ref, grads_ref, plain = _step(reference, x, dy)
    assert actcomp.layer_state(module).last.method == ("plain" if path == "exact" else path)
    assert torch.equal(y, y_ref)
    if path == "exact":  # RMSNorm with a weight: x and 1/rms where plain keeps x and x_hat
        assert kept < plain if isinstance(module, nn.RMSNorm) and module.weight is not None else kept == plain
    assert len(grads) == len(grads_ref) == 1 + sum(p is not None for p in (module.weight, getattr(module, "bias", None)))
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)


def _smooth(shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
    """Rows that vary smoothly along both trailing modes, plus 30% noise."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64).cumsum(-2).cumsum(-1)
    return (x / x.std() + 0.3 * torch.randn(shape, dtype=torch.float64)).to(dtype)


def _relative_errors(factory, eps: float) -> tuple[float, float, int, int, str]:
    """Relative error of dX and dweight against plain autograd on a smooth (4, 128, 64) input
    with a random dY; bytes kept by the policy and by plain autograd; the policy used."""
    module = _affine(factory().double())
    reference = copy.deepcopy(module)
    _compressed(module, 64, eps)
    x = _smooth((4, 128, 64))
    torch.manual_seed(1)
    dy = torch.randn_like(x)
    _, (dx, dw, *_), kept = _step(module, x, dy)
    _, (dx_ref, dw_ref, *_), plain = _step(reference, x, dy)
    error = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return error(dx, dx_ref), error(dw, dw_ref), kept, plain, actcomp.layer_state(module).last.method


@pytest.mark.parametrize("factory", [lambda: nn.LayerNorm(64), lambda: nn.RMSNorm(64)], ids=["layernorm", "rmsnorm"])
def test_gradient_error_below_eps_one_is_bounded_and_shrinks(factory):
    """At eps < 1 the error is x_hat's: sequential HOSVD of 3 modes drops at most 3 (1 - eps)
    of its energy, and dweight = sum dY x_hat with a random dY sees that error as it is; dX
    sees it through <g x_hat> only. Fewer bytes than plain, more accurate at a larger eps."""
    errors = {}
    for eps in (0.8, 0.9):
        dx_error, dw_error, kept, plain, policy = _relative_errors(factory, eps)
        bound = math.sqrt(3 * (1 - eps))
        assert policy == "factors" and kept < plain / 3
        assert 0 < dx_error < dw_error <= 1.2 * bound
        errors[eps] = (dx_error, dw_error)
    assert errors[0.9][0] < errors[0.8][0] and errors[0.9][1] < errors[0.8][1]


def test_measure_reports_the_policy_and_its_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.RMSNorm(64), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    x = _smooth((4, 128, 64), torch.float32).requires_grad_()
    actcomp.compress(model, eps=0.9, neighbours=actcomp.Neighbours(norm="factors"))
    rows = {r.name: r for r in actcomp.measure(model, x).rows}
    for name in ("1", "3"):
        assert rows[name].kind == "neighbour" and rows[name].policy == "factors"
        assert rows[name].saved_bytes < rows[name].vanilla_saved_bytes / 2
        assert actcomp.layer_state(model[int(name)]).last.kept_bytes < x.numel() * x.element_size()


def test_exact_applies_before_the_first_compressed_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.RMSNorm(6), nn.Linear(6, 6), nn.RMSNorm(6))
    actcomp.compress(model, ["1"], eps=0.5, neighbours=actcomp.Neighbours(norm="exact"))
    x = torch.randn(4, 5, 6, requires_grad=True)
    rows = {r.name: r for r in actcomp.measure(model, x).rows}
    for name in ("0", "2"):
        assert actcomp.layer_state(model[int(name)]).last.method == rows[name].policy == "plain"
        assert rows[name].saved_bytes < rows[name].vanilla_saved_bytes


def test_keep_is_the_default_and_leaves_norms_alone():
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.RMSNorm(6))
    assert actcomp.Neighbours().norm == "keep"
    actcomp.compress(model, eps=0.9)
    assert actcomp.layer_state(model[1]) is None and actcomp.layer_state(model[2]) is None
    assert type(model[1]) is nn.LayerNorm and type(model[2]) is nn.RMSNorm
    with pytest.raises(ValueError, match="norm must be one of 'keep', 'exact', 'factors'"):
        actcomp.Neighbours(norm="input")


def test_norm_before_the_first_compressed_layer_and_under_autocast_runs_plain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64), nn.LayerNorm(64))
    actcomp.compress(model, ["1"], eps=0.9, neighbours=actcomp.Neighbours(norm="factors"))
    x = _smooth((4, 128, 64), torch.float32).requires_grad_()
    rows = {r.name: r for r in actcomp.measure(model, x).rows}
    assert rows["0"].policy == "plain" and rows["0"].saved_bytes == rows["0"].vanilla_saved_bytes
    assert actcomp.layer_state(model[0]).last is None  # plain autograd: nothing recorded
    assert rows["2"].policy == actcomp.layer_state(model[2]).last.method == "factors"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    assert actcomp.layer_state(model[2]).runs == 1  # the autocast step ran plain autograd


def _llama_rms_norm(width: int) -> nn.Module:
    return pytest.importorskip("transformers.models.llama.modeling_llama").LlamaRMSNorm(width)


LOW_PRECISION = [
    pytest.param(lambda: nn.LayerNorm(64), torch.float32, 2e-5, id="layernorm-float32"),
    pytest.param(lambda: nn.LayerNorm(64), torch.bfloat16, 3e-2, id="layernorm-bfloat16"),
    pytest.param(lambda: nn.RMSNorm(64), torch.float32, 2e-5, id="rmsnorm-float32"),
    pytest.param(lambda: nn.RMSNorm(64), torch.bfloat16, 3e-2, id="rmsnorm-bfloat16"),
    # LlamaRMSNorm computes in float32 and casts x_hat back, whatever the input's dtype
    pytest.param(lambda: _llama_rms_norm(64), torch.float64, 1e-6, id="llama-float64"),
    pytest.param(lambda: _llama_rms_norm(64), torch.bfloat16, 3e-2, id="llama-bfloat16"),
]


@pytest.mark.parametrize("factory, dtype, tolerance", LOW_PRECISION)
def test_output_is_plain_and_gradients_within_the_compute_dtype(factory, dtype, tolerance, monkeypatch):
    """Output bit for bit as plain; on the factors path at eps = 1, gradients within the
    rounding of the dtype the module computes in (bf16: statistics and backward in float32, as
    torch's kernels; LlamaRMSNorm: float32 as its own forward)."""
    monkeypatch.setattr(norm_policy, "_outweighs", lambda factors, x: False)
    module = _affine(factory().to(dtype))
    reference = copy.deepcopy(module)
    _compressed(module, 64, eps=1.0, dtype=dtype)
    x = _smooth((4, 32, 64), dtype)
    torch.manual_seed(1)
    dy = torch.randn_like(x)
    y, grads, _ = _step(module, x, dy)
    y_ref, grads_ref, _ = _step(reference, x, dy)
    assert torch.equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == g_ref.dtype
        assert ((g.double() - g_ref.double()).norm() / g_ref.double().norm()).item() < tolerance


def _forward_source(cls: type) -> str:
    source = re.sub(r"\s+", " ", inspect.getsource(cls.forward))
    return source.replace("hidden_states: torch.Tensor", "hidden_states")


def test_registered_transformers_rms_norms_run_llamas_forward():
    """A transformers class is registered only if its forward is LLaMA's (what the kernel
    reproduces), compared as source text; numerically each is checked by the conformance rows."""
    pytest.importorskip("transformers")
    classes = []
    for qualified in norm_policy.TRANSFORMERS_RMS_NORM:
        module, name = qualified.rsplit(".", 1)
        classes.append(getattr(importlib.import_module(module), name))
    llama = _forward_source(classes[0])
    assert "hidden_states.to(torch.float32)" in llama and "self.weight * hidden_states.to(input_dtype)" in llama
    for cls in classes:
        assert f"{cls.__module__}.{cls.__qualname__}" in norm_policy.TRANSFORMERS_RMS_NORM
        assert _forward_source(cls) == llama, cls.__qualname__


def test_timm_fast_norm_runs_plain():
    layers = pytest.importorskip("timm.layers")
    module = layers.LayerNorm2d(4)
    module._fast_norm = True
    _compressed(module, 5, eps=0.9, dtype=torch.float32)
    x = torch.randn(2, 4, 3, 5, requires_grad=True)
    module(x).sum().backward()
    assert actcomp.layer_state(module).runs == 0


@pytest.mark.parametrize("policy", ["exact", "factors"])
@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_llama_family_from_config_at_eps_one(family, policy):
    """Every Linear and every RMSNorm of a LLaMA-family model from config (float64, a dict
    batch): gradients equal plain autograd's to the float32 precision its RMSNorms compute in,
    the step keeps less than plain, and restore() gives the classes back."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = getattr(transformers, f"{family}ForCausalLM")(config).double().train()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "labels": ids}

    def step(m: nn.Module) -> tuple[list[torch.Tensor], int]:
        m.zero_grad()
        with actcomp.count_saved(m) as saved:
            loss = m(**batch).loss
        loss.backward()
        return [p.grad.clone() for p in m.parameters()], saved.saved_bytes

    expected, plain = step(reference)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    classes = [type(m) for m in norms]
    actcomp.compress(model, sample={"input_ids": ids}, eps=1.0, neighbours=actcomp.Neighbours(norm=policy))
    assert len(norms) == 2 * 2 + 1 and all(actcomp.layer_state(m) is not None for m in norms)
    grads, kept = step(model)
    assert all(((g - e).norm() / e.norm()).item() < 1e-6 for g, e in zip(grads, expected))
    assert kept < plain
    actcomp.restore(model)
    assert [type(m) for m in norms] == classes
