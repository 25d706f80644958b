"""A whole step with every layer compressed and every neighbour handled: at eps = 1 every
gradient equals plain autograd's (float64), over Conv-BN-ReLU, Conv-ReLU6, max pooling,
residual and depthwise blocks; the step keeps far less than plain autograd."""

import copy

import pytest
import torch
from torch import nn

import actcomp


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.down = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        return self.relu(out)


def depthwise(c):
    return nn.Sequential(
        nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU6(inplace=True),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU6(inplace=True),
        nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c),
    )


MODELS = {
    "conv-bn-relu": lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.Conv2d(6, 4, 3)),
    "conv-relu6-maxpool": lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU6(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(6, 4, 1), nn.LeakyReLU(0.2)),
    "residual": lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2), Residual(6)),
    "depthwise": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), depthwise(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4, 5)),
}


def step(model, x, seed=0):
    model.zero_grad()
    xi = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout mask in both models
    y = model(xi)
    y.backward(torch.cos(3 * y.detach()))
    return y.detach(), [xi.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bn_mode", ["train", "eval-frozen"])
def test_eps_one_whole_step_equals_plain_autograd(name, bn_mode):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    if bn_mode == "eval-frozen":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval().requires_grad_(False)
    reference = copy.deepcopy(model)
    actcomp.compress(model, eps=1.0)
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    for seed in range(2):
        y, ours = step(model, x, seed)
        y_ref, theirs = step(reference, x, seed)
        assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
        for a, b in zip(ours, theirs):
            if b is None:
                assert a is None
                continue
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", MODELS)
def test_whole_step_keeps_a_fraction_of_plain(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.nn.functional.interpolate(torch.randn(8, 3, 6, 6), size=24, mode="bilinear").requires_grad_()  # smooth
    actcomp.compress(model, eps=0.8)
    report = actcomp.measure(model, x)
    assert report.saved_bytes < 0.5 * report.vanilla_saved_bytes
    kinds = {r.kind for r in report.rows}
    assert "neighbour" in kinds and "compressed" in kinds
    for row in report.rows:
        if row.kind == "neighbour":
            assert row.policy in ("bits", "indices", "nothing", "factors"), row
