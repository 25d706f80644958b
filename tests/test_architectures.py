"""Real architectures train a few steps with compression on every supported layer."""

import pytest
import torch
from torch import nn

import actcomp

torchvision = pytest.importorskip("torchvision")


class AudioNet(nn.Module):
    """A Conv1d + token Linear model: (B, C, T) -> conv stack -> (B, T, C) tokens -> head."""

    def __init__(self, classes=5):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(4, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 16, 3, stride=2, padding=1, groups=16), nn.ReLU(),
            nn.Conv1d(16, 24, 1), nn.ReLU(),
        )
        self.mix = nn.Linear(24, 24)
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        tokens = self.convs(x).transpose(1, 2)  # (B, T, C)
        return self.head(torch.relu(self.mix(tokens)).mean(1))


def train(model, x, y, steps=8, lr=0.01):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


CASES = {
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (8, 3, 32, 32), 10),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (8, 3, 32, 32), 10),
    "conv1d_linear": (lambda: AudioNet(), (8, 4, 64), 5),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hosvd", "asi", "svd"])
@pytest.mark.parametrize("name", list(CASES))
def test_trains_with_every_layer_compressed(name, method):
    build, shape, classes = CASES[name]
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(shape), torch.randint(0, classes, (shape[0],))
    actcomp.compress(model, "all", method=method, eps=0.9)
    losses = train(model, x, y)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    stats = actcomp.stats(model)
    assert len(stats) == len(actcomp.compressed_layers(model))
    assert sum(s.kept_bytes for s in stats.values()) < sum(s.input_bytes for s in stats.values())
