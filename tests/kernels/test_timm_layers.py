"""timm models built from config (random weights): timm's Linear (a subclass of nn.Linear
that overrides forward with the same computation) is registered by name and compressed, so
layers="all" leaves no Linear out, and timm's BatchNormAct2d takes the BatchNorm policy; at
eps = 1 the gradients equal plain autograd's in float64."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.kernels import base_type
from conftest import rel_err

timm = pytest.importorskip("timm")


def linear_like(model):
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "convnext_atto"])
def test_every_linear_and_conv_of_a_timm_model_is_compressed_and_exact_at_eps_one(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer left out with a warning
        actcomp.compress(model, sample=x, eps=1.0)
    assert set(actcomp.compressed_layers(model)) == linear_like(model)
    timm_linear = [n for n, m in model.named_modules() if base_type(m).__module__ == "timm.layers.linear"]
    assert bool(timm_linear) == (name == "mobilenetv3_small_050")  # its classifier
    assert set(timm_linear) <= set(actcomp.compressed_layers(model))

    def gradients(m):
        m.zero_grad()
        F.cross_entropy(m(x), torch.tensor([0, 2])).backward()
        return [p.grad.clone() for p in m.parameters()]

    expected = gradients(reference)
    ours = gradients(model)
    # per parameter, relative to its own size (some are zero but for round-off: a bias before a
    # train-mode BatchNorm), with an absolute floor for those
    assert all((a - b).norm() <= 1e-8 * b.norm() + 1e-12 for a, b in zip(ours, expected))
    assert rel_err(torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in expected])) < 1e-10


def test_timm_batchnorm_act_keeps_factors_not_its_input():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3).train()
    x = torch.randn(4, 3, 32, 32)
    actcomp.compress(model, sample=x, eps=0.9)
    report = actcomp.measure(model, x)
    rows = {r.name: r for r in report.rows}
    bn_act = [n for n, m in model.named_modules() if base_type(m).__name__ == "BatchNormAct2d" and n in rows]
    assert bn_act and any("factors" in rows[n].policy for n in bn_act)
    assert all(rows[n].saved_bytes <= rows[n].vanilla_saved_bytes for n in bn_act)


def test_timm_step_at_eps_09_keeps_less_than_plain():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3).train()
    x = torch.randn(2, 3, 32, 32)
    actcomp.compress(model, sample=x, eps=0.9)
    report = actcomp.measure(model, x)
    assert report.saved_bytes < report.vanilla_saved_bytes
