"""compress / restore / stats keep the user's model and select layers as documented."""

import copy
import io
import re

import pytest
import torch
from torch import nn

import actcomp


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
            nn.Conv3d(8, 4, 1) if False else nn.Identity(),
        )
        self.head = nn.Linear(8, 5)
        self.early = nn.Conv2d(3, 3, 1)  # registered last, runs first

    def forward(self, x):
        x = self.early(x)
        x = self.features(x).mean((2, 3))
        return self.head(x)


def step(model, x, y):
    model.zero_grad()
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def data():
    return torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))


def test_selection_forms():
    model = Net()
    supported = ["features.0", "features.3", "head", "early"]
    names = lambda: sorted(actcomp.compressed_layers(model))  # noqa: E731
    actcomp.compress(model, "all")
    assert names() == sorted(supported)
    actcomp.restore(model)
    actcomp.compress(model, "last:2")  # module order
    assert names() == ["early", "head"]
    actcomp.restore(model)
    actcomp.compress(model, "last:2", sample=torch.randn(1, 3, 8, 8))  # execution order
    assert names() == ["features.3", "head"]
    actcomp.restore(model)
    actcomp.compress(model, "re:^features\\.")
    assert names() == ["features.0", "features.3"]
    actcomp.restore(model)
    actcomp.compress(model, lambda name, m: isinstance(m, nn.Linear))
    assert names() == ["head"]
    actcomp.restore(model)
    actcomp.compress(model, ["head", "early"], method="svd", eps=0.5)
    assert actcomp.compressed_layers(model) == {
        "head": actcomp.CompressionConfig("svd", 0.5),
        "early": actcomp.CompressionConfig("svd", 0.5),
    }


def test_execution_order_sample_leaves_model_untouched():
    model = Net().train()
    model.features[1].eval()
    bn_state = copy.deepcopy(model.features[1].state_dict())
    actcomp.compress(model, "last:1", sample=torch.randn(2, 3, 8, 8))
    assert model.training and not model.features[1].training
    for k, v in model.features[1].state_dict().items():
        assert torch.equal(v, bn_state[k])


@pytest.mark.parametrize(
    "layers, message",
    [
        (["features.5"], "layer 'features.5' (Identity) has no compressed kernel; supported: Conv1D (transformers), Conv1d, Conv2d, Conv3d, Linear"),
        (["featurs.0"], "model has no layer named 'featurs.0'; did you mean 'features.0'"),
        ("last:0", "needs a whole number N >= 1"),
        ("last:9", "asks for 9 layers but the model has 4"),
        ("re:^nothing", "selects no layer"),
        ("everything", "is not understood"),
    ],
)
def test_selection_errors(layers, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        actcomp.compress(Net(), layers)


def test_unsupported_layer_type_is_named():
    model = nn.Sequential(nn.ConvTranspose2d(2, 2, 1))
    with pytest.raises(ValueError, match=re.escape("layer '0' (ConvTranspose2d) has no compressed kernel")):
        actcomp.compress(model, ["0"])


@pytest.mark.parametrize("kwargs", [{"method": "tucker"}, {"eps": 0.0}, {"eps": 2}])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        actcomp.compress(Net(), **kwargs)
    with pytest.raises(ValueError, match="either config= or method=/eps="):
        actcomp.compress(Net(), config=actcomp.CompressionConfig(), eps=0.5)


def test_model_is_kept_and_restore_is_bit_identical(data):
    x, y = data
    reference = Net()
    model = copy.deepcopy(reference)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    actcomp.compress(model, eps=0.5)
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert isinstance(model.features[0], nn.Conv2d) and isinstance(model.head, nn.Linear)
    step(model, x, y)  # a compressed step (no optimizer: parameters stay as they are)
    actcomp.restore(model)
    assert type(model.features[0]) is nn.Conv2d and type(model.head) is nn.Linear
    assert not actcomp.compressed_layers(model)
    out_a, grads_a = step(model, x, y)
    out_b, grads_b = step(reference, x, y)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    # BatchNorm running stats moved in both models by the same steps, except the compressed one
    reference.load_state_dict(model.state_dict())


def test_state_dict_and_pickle_round_trip(data):
    x, _ = data
    model = actcomp.compress(Net(), eps=0.7)
    other = actcomp.compress(Net(), eps=0.7)
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    assert torch.equal(model(x), other(x))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert actcomp.compressed_layers(loaded) == actcomp.compressed_layers(model)
    assert torch.equal(loaded(x), model(x))


def test_eval_and_no_grad_run_the_plain_layer(data):
    x, _ = data
    model = actcomp.compress(Net(), eps=0.5)
    with torch.no_grad():
        model(x)
    assert actcomp.stats(model) == {}
    model.eval()
    model(x).sum().backward()
    assert actcomp.stats(model) == {}
    model.train()
    model(x)
    assert sorted(actcomp.stats(model)) == ["early", "features.0", "features.3", "head"]


def test_stats_report_ranks_and_bytes(data):
    x, _ = data
    model = actcomp.compress(Net(), ["features.0"], eps=0.6)
    actcomp.compress(model, ["head"], method="none")
    model(x).sum().backward()
    conv, head = actcomp.stats(model)["features.0"], actcomp.stats(model)["head"]
    assert conv.input_shape == (6, 3, 8, 8) and len(conv.ranks) == 4
    assert conv.input_bytes == 6 * 3 * 8 * 8 * 4
    assert 0 < conv.kept_bytes and conv.ratio == conv.kept_bytes / conv.input_bytes
    assert head.method == "none" and head.kept_bytes == head.input_bytes == 6 * 8 * 4
    assert conv.as_dict()["ratio"] == conv.ratio
    assert "actcomp=hosvd(eps=0.6)" in repr(model)


def test_compress_twice_updates_settings():
    model = actcomp.compress(Net(), ["head"], eps=0.5)
    actcomp.compress(model, ["head"], method="svd", eps=0.9)
    assert actcomp.compressed_layers(model) == {"head": actcomp.CompressionConfig("svd", 0.9)}
    actcomp.restore(model)
    assert type(model.head) is nn.Linear


def test_pickled_model_loads_in_a_new_process(tmp_path, data):
    """The compressed classes are made at run time: a new process must still load the model
    (pickled by the base class) and keep training it compressed."""
    import subprocess
    import sys

    x, _ = data
    model = nn.Sequential(  # torch's classes only: the new process imports nothing of the tests
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    actcomp.compress(model, eps=0.7).eval()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    torch.save(model(x), tmp_path / "out.pt")
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import torch, actcomp
model = torch.load({str(path)!r}, weights_only=False)
x = torch.load({str(tmp_path / 'x.pt')!r})
assert torch.equal(model(x), torch.load({str(tmp_path / 'out.pt')!r}))
assert sorted(actcomp.compressed_layers(model)) == ["0", "3", "6"]
assert type(model[6]).__name__ == "CompressedLinear" and isinstance(model[6], torch.nn.Linear)
model.train()
model(x).sum().backward()
assert actcomp.stats(model)["6"].ranks
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_layer_state_and_suspended(data):
    x, y = data
    model = actcomp.compress(Net(), ["head", "early"], method="asi", eps=0.8)
    assert actcomp.layer_state(model.features[0]) is None
    state = actcomp.layer_state(model.head)
    assert state.name == "head" and state.layer_type == "Linear" and state.config == actcomp.CompressionConfig("asi", 0.8)
    step(model, x, y)
    tracker, last = state.method_state, state.last
    assert tracker is state.tracker and tracker.steps == 1
    reference = copy.deepcopy(model)
    actcomp.restore(reference)
    with actcomp.suspended(model):
        out, grads = step(model, x, y)  # plain autograd: bit-identical to the restored copy
        assert not state.active
    ref_out, ref_grads = step(reference, x, y)
    assert torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert state.active and state.method_state is tracker and tracker.steps == 1 and state.last is last
    data_ = state.state_dict()
    # only the method's own settings are recorded: asi declares none (gradient_filter: patch)
    assert set(data_) == {"kind", "method", "eps", "method_state"} and data_["kind"] == "layer"
    buffer = io.BytesIO()
    torch.save(data_, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # plain data: no pickled classes
    other = actcomp.compress(Net(), ["head"], method="hosvd")
    actcomp.layer_state(other.head).load_state_dict(loaded)
    restored = actcomp.layer_state(other.head)
    assert restored.config.method == "asi" and restored.method_state.steps == 1
    assert all(torch.equal(tracker.factors[m], restored.method_state.factors[m]) for m in tracker.factors)
    actcomp.compress(model, ["head"], method="asi", eps=0.9)  # same method: subspaces kept
    assert state.method_state is tracker and state.config.eps == 0.9
