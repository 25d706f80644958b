"""Built-in small models for demos and tests: MobileNetV2-style CNNs sized for MCU budgets."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn


def train_only(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Freeze every parameter of ``model``, then unfreeze those of the modules ``names``
    (qualified names); returns ``model``."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].requires_grad_(True)
    return model


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, depthwise 3x3, 1x1 project, residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            _conv_bn_relu(c_in, hidden, 1),
            _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    """A MobileNetV2-style CNN for small grey or colour images (about 30k parameters).

    stem 3x3 (stride 2) -> 4 inverted-residual blocks -> 1x1 conv -> global pool -> Linear.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w, 3, 2),
            InvertedResidual(w, w, 1, 2),
            InvertedResidual(w, 2 * w, 2, 4),
            InvertedResidual(2 * w, 2 * w, 1, 4),
            InvertedResidual(2 * w, 3 * w, 2, 4),
            _conv_bn_relu(3 * w, 6 * w, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(6 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
