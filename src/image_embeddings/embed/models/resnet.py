"""torchvision's ResNet-50 (its V1.5: the stride on the 3x3 convolution) as a plain torch module.

Same layers, in the same order, with the same names and shapes, so torchvision's weights files (and any state
dict of ``torchvision.models.resnet50``) load into it, and ``random:SEED`` weights are drawn exactly as torchvision
draws them; the tests compare both parameters and outputs with torchvision's own model. It exists because
``import torchvision`` is slow in every Python worker that embeds (torchvision.ops pulls in torch._dynamo, and
torchvision.models every architecture it has), for this one architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _conv(inputs: int, outputs: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False)


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided), 1x1 convolutions with BatchNorm, and the residual connection."""

    expansion = 4
    conv_bn = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # each BatchNorm takes that output directly

    def __init__(self, inputs: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv(inputs, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, width * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Any) -> Any:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """The stem, four stages of bottleneck blocks, global average pooling and the 1000-class head ``fc``."""

    conv_bn = (("conv1", "bn1"),)

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 4, 6, 3), classes: int = 1000) -> None:
        super().__init__()
        self._inputs = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._stage(64, blocks[0])
        self.layer2 = self._stage(128, blocks[1], stride=2)
        self.layer3 = self._stage(256, blocks[2], stride=2)
        self.layer4 = self._stage(512, blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, classes)
        # torchvision's initialization, in its order (random:SEED weights depend on it). Skipped for a model built on
        # the meta device to receive a weights file: there, drawing would import torch._dynamo for nothing.
        for module in () if self.conv1.weight.is_meta else self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _stage(self, width: int, blocks: int, stride: int = 1) -> nn.Sequential:
        outputs = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._inputs != outputs:
            downsample = nn.Sequential(_conv(self._inputs, outputs, 1, stride), nn.BatchNorm2d(outputs))
        layers = [Bottleneck(self._inputs, width, stride, downsample)]
        self._inputs = outputs
        layers += [Bottleneck(outputs, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Any) -> Any:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50() -> ResNet:
    """A randomly initialized ResNet-50, as ``torchvision.models.resnet50(weights=None)``."""
    return ResNet((3, 4, 6, 3))


build = resnet50


def headless(model: ResNet) -> ResNet:
    """Replace the head ``fc`` with the identity: the output is the 2048-d pooled features."""
    model.fc = nn.Identity()  # type: ignore[assignment]
    return model
