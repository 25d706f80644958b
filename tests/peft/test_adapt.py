"""svd_adapt / merge on whole models: identity of the model, state_dict, merge, refusals."""

import io
import re

import pytest
import torch
from torch import nn

import actcomp
from actcomp.peft import SVDConv2d, SVDLinear, adapted_layers, merge, select_adaptable, svd_adapt
from conftest import rel_err


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def trained_like(model):
    """Perturb the adapted layers' parameters as training would."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (SVDLinear, SVDConv2d)):
                m.s.mul_(1 + 0.3 * torch.randn_like(m.s))
                if m.reflectors is not None:
                    m.reflectors.add_(0.3 * torch.randn_like(m.reflectors))
    return model


def test_model_keeps_its_objects_and_other_parameters():
    model = Net()
    modules_before = dict(model.named_modules())
    bias = model.head[0].bias
    bn_weight = model.features[1].weight
    svd_adapt(model, ["features.0", "head.0"], reflections=4)
    assert dict(model.named_modules()) == modules_before  # same objects under the same names
    assert model.head[0].bias is bias and model.features[1].weight is bn_weight
    assert isinstance(model.head[0], nn.Linear) and isinstance(model.features[0], nn.Conv2d)
    assert type(model.head[2]) is nn.Linear  # not selected: untouched
    keys = set(model.state_dict())
    assert {"head.0.s", "head.0.reflectors", "head.0.u0", "head.0.v0", "head.0.bias"} <= keys
    assert "head.0.weight" not in keys and "head.2.weight" in keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.0.s", "head.0.reflectors", "features.0.s", "features.0.reflectors"} <= trainable
    assert all("u0" not in n and "v0" not in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("train, reflections, side", [("s", None, "out"), ("s+q", 8, "out"), ("s+q", 4, "in")])
def test_merge_outputs_equal_the_adapted_model(train, reflections, side):
    model = Net().eval()
    plain_keys = list(model.state_dict())
    svd_adapt(model, "all", reflections=reflections, train=train, side=side)
    trained_like(model)
    x = torch.randn(4, 3, 8, 8)
    adapted_out = model(x)
    ids = {n: id(m) for n, m in model.named_modules()}
    merge(model)
    assert {n: id(m) for n, m in model.named_modules()} == ids
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert list(model.state_dict()) == plain_keys
    assert rel_err(model(x), adapted_out) < 1e-6
    assert adapted_layers(model) == {}
    fresh = Net().eval()
    fresh.load_state_dict(model.state_dict())  # loads into the original architecture
    assert rel_err(fresh(x), adapted_out) < 1e-6


def test_state_dict_round_trip():
    torch.manual_seed(0)
    source = trained_like(svd_adapt(Net().eval(), "all", reflections=6, generator=torch.Generator().manual_seed(1)))
    target = svd_adapt(Net().eval(), "all", reflections=6, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(target(x), source(x)) > 1e-3
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(x), source(x))
    buffer = io.BytesIO()
    torch.save(source, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.head[0]) is SVDLinear and torch.equal(loaded(x), source(x))


def test_generator_makes_initialisation_reproducible():
    a = svd_adapt(Net(), "all", generator=torch.Generator().manual_seed(3))
    c = svd_adapt(Net(), "all", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.head[0].reflectors, c.head[0].reflectors)
    r = a.head[0].reflectors
    assert torch.equal(r[0::2], r[1::2]) and torch.allclose(r.norm(dim=1), torch.ones(len(r)))


def test_adapted_layers_counts_trainable_parameters():
    model = svd_adapt(Net(), ["head.0", "features.3"], reflections=4)
    found = adapted_layers(model)
    assert set(found) == {"head.0", "features.3"}
    head = found["head.0"]  # Linear(32, 16): k = 16, 4 vectors in R^16, bias 16
    assert (head.rank, head.reflections, head.side, head.train) == (16, 4, "out", "s+q")
    assert head.trainable_params == 16 + 4 * 16 + 16
    conv = found["features.3"]  # Conv2d(8, 8, 3, groups=4): W is 8 x (2*3*3) = 8 x 18
    assert conv.rank == 8 and conv.trainable_params == 8 + 4 * 8 + 8


def test_selection():
    model = Net()
    assert select_adaptable(model, "all") == ["features.0", "features.3", "head.0", "head.2"]
    assert select_adaptable(model, "last:2", sample=torch.randn(1, 3, 8, 8)) == ["head.0", "head.2"]
    assert select_adaptable(model, "re:^head") == ["head.0", "head.2"]
    assert select_adaptable(model, lambda n, m: isinstance(m, nn.Conv2d)) == ["features.0", "features.3"]


def test_refusals():
    model = Net()
    with pytest.raises(ValueError, match="even"):
        svd_adapt(model, "all", reflections=3)
    with pytest.raises(ValueError, match="train='s' trains only"):
        svd_adapt(model, "all", reflections=4, train="s")
    with pytest.raises(ValueError, match="train="):
        svd_adapt(model, "all", train="q")
    with pytest.raises(ValueError, match="side="):
        svd_adapt(model, "all", side="left")
    with pytest.raises(ValueError, match="no layer named 'head.O'; did you mean .*'head.0'"):
        svd_adapt(model, ["head.O"])
    with pytest.raises(ValueError, match=r"layer 'features.1' \(BatchNorm2d\) cannot be SVD-parametrised"):
        svd_adapt(model, ["features.1"])
    with pytest.raises(ValueError, match="selects no adaptable layer"):
        svd_adapt(model, "re:nothing")
    svd_adapt(model, ["head.0"])
    with pytest.raises(ValueError, match="already SVD-parametrised"):
        svd_adapt(model, ["head.0"])
    actcomp.compress(model, ["head.2"], method="hosvd")
    with pytest.raises(ValueError, match=r"'head.2' \(CompressedLinear\) is compressed"):
        svd_adapt(model, ["head.2"])


def test_tied_weight_is_refused():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match="shared by 0.weight, 1.weight"):
        svd_adapt(model, ["1"])


def test_subclass_is_not_adapted():
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(ValueError, match=r"\(MyLinear\) cannot be SVD-parametrised"):
        svd_adapt(nn.Sequential(MyLinear(3, 3)), ["0"])


@pytest.mark.parametrize("layers", ["all", "last:1", "re:^head", ["head.2", "head.0", "head.2"], "last:x", "last:9", "bad", "re:none"])
def test_selection_syntax_is_compress_s_own(layers):
    """svd_adapt reads layers= as compress does (every layer of Net is both adaptable and
    compressible): the same names, and the same errors but for the name of the layers."""
    from actcomp.attach.select import select_layers

    def outcome(select):
        try:
            return select(Net(), layers)
        except ValueError as error:
            return re.sub(r"(adaptable ones|with a compressed kernel|adaptable layer|layer with a compressed kernel) \(.*", "", str(error))

    assert outcome(select_adaptable) == outcome(select_layers)


def test_adapt_asks_attach_whether_a_layer_is_compressed(monkeypatch):
    """select_adaptable and merge use actcomp.attach's public layer_state, not an attribute name."""
    import inspect

    from actcomp.attach.select import resolve_selection
    from actcomp.peft import adapt

    assert adapt.resolve_selection is resolve_selection
    assert "_actcomp_layer" not in inspect.getsource(adapt)
    model = Net()
    monkeypatch.setattr(adapt, "layer_state", lambda module: object() if module is model.head[0] else None)
    with pytest.raises(ValueError, match=r"'head.0' \(Linear\) is compressed"):
        svd_adapt(model, ["head.0"])
