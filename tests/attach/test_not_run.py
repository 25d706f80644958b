"""A layer selected for compression whose kernel does not run is reported, never counted as
compressed: found by the traced forward with ``sample=``, or after a training forward."""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.core.state import KernelNotRunWarning


class ReadsWeight(nn.Module):
    """Like swin's attention: the parent computes with its child's weight itself."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x):
        return self.mlp(F.linear(x, self.proj.weight, self.proj.bias).relu())


class Tied(nn.Module):
    """Like GPT-2's lm_head: a Linear whose weight an embedding also reads; both run."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.embed(tokens))


def step(model, x):
    model(x).square().mean().backward()


@pytest.fixture
def x():
    return torch.randn(4, 3, 8)


def test_training_forward_reports_a_layer_whose_kernel_did_not_run(x):
    model = ReadsWeight()
    actcomp.compress(model, "all", eps=0.8)  # no sample: both layers are compressed (at 0.8 the factors are smaller than x)
    assert sorted(actcomp.compressed_layers(model)) == ["mlp", "proj"]
    with pytest.warns(KernelNotRunWarning, match=re.escape("layer 'proj' (Linear) is compressed but its kernel did not run")) as caught:
        step(model, x)
    assert len(caught) == 1 and "its forward was not called" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, x)  # warned once per layer
    stats = actcomp.stats(model)
    assert stats["proj"].method == "not run" and stats["proj"].kept_bytes == 0 and math.isnan(stats["proj"].ratio)
    assert "not called" in stats["proj"].reason and stats["proj"].as_dict()["method"] == "not run"
    assert stats["mlp"].method == "hosvd" and stats["mlp"].kept_bytes > 0
    state = actcomp.layer_state(model.proj)
    assert state.missed == 2 and state.runs == 0 and state.ran_last is False
    assert actcomp.layer_state(model.mlp).missed == 0 and actcomp.layer_state(model.mlp).ran_last


def test_sample_finds_the_parent_that_reads_the_weight(x):
    model = ReadsWeight()
    message = "layer 'proj' (Linear): its own forward is never called, the model's own forward (ReadsWeight) uses its parameters itself (first in torch.nn.functional.linear)"
    with pytest.warns(KernelNotRunWarning, match=re.escape(message)):
        actcomp.compress(model, "all", sample=x[:1])
    assert list(actcomp.compressed_layers(model)) == ["mlp"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, x)  # nothing left that does not run
    with pytest.raises(ValueError, match=re.escape(message + ", so its compressed kernel cannot run; leave it out")):
        actcomp.compress(model, ["proj"], sample=x[:1])
    with pytest.warns(KernelNotRunWarning):
        assert actcomp.compress(ReadsWeight(), "re:proj|mlp", sample=x[:1]) is not None


def test_multihead_attention_out_proj_runs_with_its_parent():
    """torch's MultiheadAttention passes out_proj.weight to its functional form; its compressed
    kernel (actcomp/kernels/mha.py) calls out_proj's forward instead, so both are selected."""
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actcomp.compress(model, "all", sample=x[:1])
        step(model, x)
    assert sorted(actcomp.compressed_layers(model)) == ["linear1", "linear2", "self_attn", "self_attn.out_proj"]
    assert all(actcomp.layer_state(m).runs == 1 for n, m in model.named_modules() if n in actcomp.compressed_layers(model))


def test_tied_weight_read_by_another_module_still_runs():
    model = Tied()
    tokens = torch.randint(0, 10, (2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actcomp.compress(model, "all", sample=tokens[:1])
        step(model, tokens)
    assert list(actcomp.compressed_layers(model)) == ["head"] and actcomp.layer_state(model.head).runs == 1


def test_suspended_eval_no_grad_and_errors_are_not_misses(x):
    model = ReadsWeight()
    actcomp.compress(model, "all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with actcomp.suspended(model):
            step(model, x)
        model.eval()
        step(model, x)
        model.train()
        with torch.no_grad():
            model(x)
        with pytest.raises(RuntimeError):
            model(torch.randn(4, 3, 5))  # a shape error in the forward: no step ran
    assert actcomp.layer_state(model.proj).missed == 0


def test_layer_in_eval_mode_inside_a_training_model_is_reported(x):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    actcomp.compress(model, "all", eps=0.8)  # at the default 0.99 the factors outweigh x: it would keep x ("plain")
    model[0].eval()
    with pytest.warns(KernelNotRunWarning, match="it is in eval mode"):
        step(model, x)
    assert actcomp.stats(model)["0"].method == "not run"
    model[0].train()
    step(model, x)
    assert actcomp.stats(model)["0"].method == "hosvd"  # ran again: its stats are back


def test_restore_removes_the_watch(x):
    model = ReadsWeight()
    actcomp.compress(model, "all")
    actcomp.restore(model)
    assert not model._forward_hooks and not model._forward_pre_hooks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, x)
